package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
)

// request is an OPEN payload: every op's fields in one struct (unknown fields are ignored).
type request struct {
	Op        string            `json:"op"`
	Argv      []string          `json:"argv"`
	Env       map[string]string `json:"env"`
	Cwd       string            `json:"cwd"`
	User      string            `json:"user"`
	TTY       bool              `json:"tty"`
	Cols      int               `json:"cols"`
	Rows      int               `json:"rows"`
	Stdin     bool              `json:"stdin"`
	TimeoutMS int64             `json:"timeout_ms"`
	MaxOutput int64             `json:"max_output"`
	LogBytes  int64             `json:"log_bytes"`
	PID       int               `json:"pid"`
	Follow    bool              `json:"follow"`
	Signal    string            `json:"signal"`
	Path      string            `json:"path"`
	Root      string            `json:"root"`
	Limit     int               `json:"limit"`
	MaxBytes  int64             `json:"max_bytes"`
	Mkdirs    bool              `json:"mkdirs"`
	Parents   bool              `json:"parents"`
	Recursive bool              `json:"recursive"`
	To        string            `json:"to"`
	Host      string            `json:"host"`
	Port      int               `json:"port"`
	Secret    string            `json:"secret"`
}

// opError is an error answered as {"error": {"code", "message"}}.
type opError struct {
	code, msg string
}

func (e *opError) Error() string { return e.code + ": " + e.msg }

func errf(code, format string, a ...any) error {
	return &opError{code: code, msg: fmt.Sprintf(format, a...)}
}

// server is one `den-agent serve`: it reads frames from in, writes frames to out.
type server struct {
	in   io.Reader
	out  chan []byte // whole frames, written by one writer goroutine
	log  *log.Logger
	boot string

	mu    sync.Mutex
	chans map[uint32]*channel

	procs *procTable

	// onWriteError is called once when writing to the host fails (serve exits then).
	onWriteError func(error)
	writerDone   chan struct{}
}

func newServer(in io.Reader, out io.Writer, logger *log.Logger) *server {
	var b [8]byte
	_, _ = rand.Read(b[:])
	s := &server{
		in:         in,
		out:        make(chan []byte, 64),
		log:        logger,
		boot:       hex.EncodeToString(b[:]),
		chans:      map[uint32]*channel{},
		procs:      newProcTable(),
		writerDone: make(chan struct{}),
	}
	go s.writer(out)
	return s
}

// maxBatch bounds how many bytes of queued frames one write to the host carries.
const maxBatch = 256 * 1024

func (s *server) writer(w io.Writer) {
	defer close(s.writerDone)
	var failed bool
	var batch []byte
	for b := range s.out {
		// Frames queued meanwhile go out in the same write: every write wakes the relay and
		// the engine's stream once (an exec's started, EOFs, exit and CLOSE come together).
		batch = append(batch[:0], b...)
	more:
		for len(batch) < maxBatch {
			select {
			case next, ok := <-s.out:
				if !ok {
					break more
				}
				batch = append(batch, next...)
			default:
				break more
			}
		}
		b = batch
		if _, err := w.Write(b); err != nil {
			// The host's attach is gone (a checkpoint, Den restarting): drop the frame and
			// go on; the next session starts with a HELLO anyway.
			if !failed {
				s.log.Printf("write to host failed: %v", err)
			}
			failed = true
			if s.onWriteError != nil {
				go s.onWriteError(err)
			}
			continue
		}
		failed = false
	}
}

// run reads frames until the input ends; its error is nil at EOF.
func (s *server) run() error {
	fr := newFrameReader(s.in)
	fr.onResync = func(reason string) { s.log.Printf("malformed input (%s): scanning for HELLO", reason) }
	for {
		f, err := fr.next()
		if err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		s.handle(f)
	}
}

func (s *server) send(typ, flags uint8, ch uint32, payload []byte) {
	s.out <- encodeFrame(typ, flags, ch, payload)
}

func (s *server) handle(f frame) {
	if f.typ == tHello {
		s.hello(f.payload)
		return
	}
	if f.typ == tOpen {
		s.open(f)
		return
	}
	s.mu.Lock()
	c := s.chans[f.ch]
	s.mu.Unlock()
	if c == nil {
		return // a channel that is over (or never was): nothing to answer
	}
	stream := int(f.flags & 1)
	switch f.typ {
	case tMsg:
		var m map[string]json.RawMessage
		if json.Unmarshal(f.payload, &m) != nil {
			s.log.Printf("chan %d: bad MSG ignored", f.ch)
			return
		}
		c.mu.Lock()
		onMsg := c.onMsg
		c.mu.Unlock()
		if onMsg != nil {
			c.safe(func() { onMsg(m) })
		}
	case tData:
		if q := c.in[stream]; q != nil {
			if !q.push(f.payload) {
				s.log.Printf("chan %d: DATA beyond the window dropped", f.ch)
			}
		}
	case tEOF:
		if q := c.in[stream]; q != nil {
			q.setEOF()
		}
	case tWindow:
		if len(f.payload) != 4 {
			return
		}
		c.mu.Lock()
		c.win[stream] += int64(binary.BigEndian.Uint32(f.payload))
		c.cond.Broadcast()
		c.mu.Unlock()
	case tClose:
		s.remove(c)
		c.hostClose(false)
	}
}

func (s *server) hello(payload []byte) {
	var h struct {
		Nonce any `json:"nonce"`
	}
	_ = json.Unmarshal(payload, &h)
	// A new session: every channel of the previous one ends.
	s.mu.Lock()
	old := s.chans
	s.chans = map[uint32]*channel{}
	s.mu.Unlock()
	for _, c := range old {
		c.hostClose(true)
	}
	reply, _ := json.Marshal(map[string]any{
		"v": 1, "nonce": h.Nonce, "version": version, "boot": s.boot, "pid": os.Getpid(),
	})
	s.send(tHello, 0, 0, reply)
	if len(old) > 0 {
		s.log.Printf("new session: %d channels of the previous one closed", len(old))
	}
}

func (s *server) remove(c *channel) {
	s.mu.Lock()
	if s.chans[c.id] == c {
		delete(s.chans, c.id)
	}
	s.mu.Unlock()
}

var ops = map[string]func(*channel, *request) error{
	"ping":    opPing,
	"exec":    opExec,
	"spawn":   opSpawn,
	"ps":      opPs,
	"logs":    opLogs,
	"signal":  opSignal,
	"stat":    opStat,
	"list":    opList,
	"read":    opRead,
	"write":   opWrite,
	"mkdir":   opMkdir,
	"remove":  opRemove,
	"rename":  opRename,
	"connect": opConnect,
	"status":  opStatus,
	"direct":  opDirect,
	"user":    opUser,
}

func (s *server) open(f frame) {
	if f.ch == 0 {
		s.log.Printf("OPEN on channel 0 ignored")
		return
	}
	c := newChannel(s, f.ch)
	s.mu.Lock()
	if s.chans[f.ch] != nil {
		s.mu.Unlock()
		s.log.Printf("OPEN on channel %d, which is open, ignored", f.ch)
		return
	}
	s.chans[f.ch] = c
	s.mu.Unlock()

	var req request
	if err := json.Unmarshal(f.payload, &req); err != nil {
		c.fail(errf("invalid", "bad request: %v", err))
		return
	}
	c.op = req.Op
	h := ops[req.Op]
	if h == nil {
		c.fail(errf("invalid", "unknown op %q", req.Op))
		return
	}
	// Ops that take DATA from the host get their input queues before the reader can see any.
	switch req.Op {
	case "exec":
		if req.Stdin {
			c.in[0] = newInbound()
		}
		c.isExec = true
	case "write", "connect":
		c.in[0] = newInbound()
	}
	go func() {
		defer func() {
			if p := recover(); p != nil {
				s.log.Printf("chan %d (%s): panic: %v\n%s", c.id, req.Op, p, debug.Stack())
				c.fail(errf("failed", "internal error: %v", p))
			}
		}()
		if err := h(c, &req); err != nil {
			c.fail(err)
			return
		}
		c.finish()
	}()
}

// channel is one open channel of a session.
type channel struct {
	s      *server
	id     uint32
	op     string
	isExec bool

	mu   sync.Mutex
	cond *sync.Cond
	// gone: nothing more may be sent (the agent sent CLOSE, or the host closed the channel, or
	// its session ended). muted: no more DATA/EOF (an exec that answered while a background
	// child holds its pipes).
	gone       bool
	muted      bool
	eofSent    [2]bool
	done       chan struct{} // closed when gone
	win        [2]int64      // DATA bytes the host still accepts per stream
	waitingWin int           // senders blocked on an empty window

	in [2]*inbound // the host's DATA per stream, for ops that take input

	onMsg       func(map[string]json.RawMessage)
	onClose     func(sessionEnd bool) // the host closed the channel, or its session ended
	closeReason int                   // 0: open; 1: host CLOSE; 2: session ended
}

// setOnMsg sets what a MSG from the host does (set by the op's goroutine, read by the
// session's reader).
func (c *channel) setOnMsg(f func(map[string]json.RawMessage)) {
	c.mu.Lock()
	c.onMsg = f
	c.mu.Unlock()
}

// setOnClose sets what a host CLOSE (or the session's end) does; when that has already
// happened, f runs at once.
func (c *channel) setOnClose(f func(sessionEnd bool)) {
	c.mu.Lock()
	reason := c.closeReason
	if reason == 0 {
		c.onClose = f
	}
	c.mu.Unlock()
	if reason != 0 {
		f(reason == 2)
	}
}

func newChannel(s *server, id uint32) *channel {
	c := &channel{s: s, id: id, done: make(chan struct{}), win: [2]int64{initWindow, initWindow}}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// safe runs f, turning a panic into an error answer on the channel.
func (c *channel) safe(f func()) {
	defer func() {
		if p := recover(); p != nil {
			c.s.log.Printf("chan %d (%s): panic: %v\n%s", c.id, c.op, p, debug.Stack())
			c.fail(errf("failed", "internal error: %v", p))
		}
	}()
	f()
}

// goSafe runs f in a goroutine with safe.
func (c *channel) goSafe(f func()) { go c.safe(f) }

func (c *channel) setGoneLocked() {
	if !c.gone {
		c.gone = true
		close(c.done)
		c.cond.Broadcast()
	}
}

// sendLocked sends a frame unless the channel is gone; c.mu is held.
func (c *channel) sendLocked(typ, flags uint8, payload []byte) bool {
	if c.gone {
		return false
	}
	c.s.send(typ, flags, c.id, payload)
	return true
}

func (c *channel) msg(v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(map[string]any{"error": map[string]string{"code": "failed", "message": err.Error()}})
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sendLocked(tMsg, 0, b)
}

func (c *channel) ok(v any) bool {
	if v == nil {
		v = struct{}{}
	}
	return c.msg(map[string]any{"ok": v})
}

// finish sends CLOSE (once) and forgets the channel.
func (c *channel) finish() {
	c.mu.Lock()
	c.sendLocked(tClose, 0, nil)
	c.setGoneLocked()
	c.mu.Unlock()
	c.s.remove(c)
}

// fail answers an error and closes the channel.
func (c *channel) fail(err error) {
	var oe *opError
	if !errors.As(err, &oe) {
		oe = &opError{code: "failed", msg: err.Error()}
	}
	c.msg(map[string]any{"error": map[string]string{"code": oe.code, "message": oe.msg}})
	c.finish()
}

// hostClose: the host closed the channel (or its session ended). Nothing more is sent.
func (c *channel) hostClose(sessionEnd bool) {
	c.mu.Lock()
	already := c.gone
	c.setGoneLocked()
	if c.closeReason == 0 {
		c.closeReason = 1
		if sessionEnd {
			c.closeReason = 2
		}
	}
	f := c.onClose
	c.mu.Unlock()
	for _, q := range c.in {
		if q != nil {
			q.close()
		}
	}
	if f != nil && !already {
		c.safe(func() { f(sessionEnd) })
	}
}

// sendData sends p as DATA on stream within the host's window, waiting for WINDOW grants.
// It returns false (and sends nothing more) once the channel is gone or muted.
func (c *channel) sendData(stream int, p []byte) bool {
	for len(p) > 0 {
		c.mu.Lock()
		for c.win[stream] <= 0 && !c.gone && !c.muted {
			c.waitingWin++
			c.cond.Wait()
			c.waitingWin--
		}
		if c.gone || c.muted {
			c.mu.Unlock()
			return false
		}
		n := int64(len(p))
		if n > c.win[stream] {
			n = c.win[stream]
		}
		if n > 65536 {
			n = 65536
		}
		c.win[stream] -= n
		c.sendLocked(tData, uint8(stream), p[:n])
		c.mu.Unlock()
		p = p[n:]
	}
	return true
}

func (c *channel) sendEOF(stream int) {
	c.mu.Lock()
	c.sendEOFLocked(stream)
	c.mu.Unlock()
}

func (c *channel) sendEOFLocked(stream int) {
	if !c.muted && !c.eofSent[stream] {
		c.eofSent[stream] = true
		c.sendLocked(tEOF, uint8(stream), nil)
	}
}

// grant tells the host it may send n more bytes on stream (they have been consumed).
func (c *channel) grant(stream int, n int) {
	if n <= 0 {
		return
	}
	if q := c.in[stream]; q != nil {
		q.mu.Lock()
		q.avail += int64(n)
		q.mu.Unlock()
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(n))
	c.mu.Lock()
	c.sendLocked(tWindow, uint8(stream), b[:])
	c.mu.Unlock()
}

func (c *channel) isGone() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gone
}

// inbound queues the host's DATA for one stream; it never holds more than the window.
type inbound struct {
	mu     sync.Mutex
	cond   *sync.Cond
	chunks [][]byte
	avail  int64 // bytes the host may still send
	eof    bool
	closed bool
}

var errClosed = errors.New("channel closed")

func newInbound() *inbound {
	q := &inbound{avail: initWindow}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *inbound) push(p []byte) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.eof {
		return true
	}
	if int64(len(p)) > q.avail {
		return false
	}
	q.avail -= int64(len(p))
	if len(p) > 0 {
		q.chunks = append(q.chunks, p)
		q.cond.Broadcast()
	}
	return true
}

func (q *inbound) setEOF() {
	q.mu.Lock()
	q.eof = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

func (q *inbound) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// pop returns the next chunk, io.EOF after the host's EOF, errClosed once closed.
func (q *inbound) pop() ([]byte, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.chunks) == 0 && !q.eof && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		return nil, errClosed
	}
	if len(q.chunks) > 0 {
		p := q.chunks[0]
		q.chunks[0] = nil
		q.chunks = q.chunks[1:]
		return p, nil
	}
	return nil, io.EOF
}

func opPing(c *channel, r *request) error {
	c.ok(nil)
	return nil
}

func opStatus(c *channel, r *request) error {
	s := c.s
	s.mu.Lock()
	sessions := 0
	for _, ch := range s.chans {
		if ch.isExec {
			sessions++
		}
	}
	s.mu.Unlock()
	c.ok(map[string]any{"processes": s.procs.running(), "sessions": sessions, "version": version,
		"cpu_ns": cpuNanos(), "memory_bytes": memoryBytes()})
	return nil
}

// memoryBytes is the memory the workspace holds now: its processes, page cache and tmpfs
// files. Under gVisor the memory cgroup's usage (cgroup v1 inside the sandbox) is the
// sandbox's own accounting; else cgroup v2's memory.current; else MemTotal less MemAvailable
// from /proc/meminfo. -1 when unknown.
func memoryBytes() int64 {
	for _, path := range []string{"/sys/fs/cgroup/memory/memory.usage_in_bytes",
		"/sys/fs/cgroup/memory.current"} {
		if data, err := os.ReadFile(path); err == nil {
			if n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); err == nil {
				return n
			}
		}
	}
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	kb := map[string]int64{}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			if n, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				kb[strings.TrimSuffix(f[0], ":")] = n
			}
		}
	}
	total, okT := kb["MemTotal"]
	avail, okA := kb["MemAvailable"]
	if !okT || !okA || avail > total {
		return -1
	}
	return (total - avail) * 1024
}

// cpuNanos is the CPU time the workspace's processes have used: the cpuacct cgroup's usage
// (cgroup v1, which gVisor provides inside the sandbox: its own tasks only, without the
// sandbox's overhead on the host, which is what the idle policy wants to see), else cgroup
// v2's cpu.stat, else the "cpu" line of /proc/stat (all zeros under gVisor). -1 when unknown.
func cpuNanos() int64 {
	if data, err := os.ReadFile("/sys/fs/cgroup/cpuacct/cpuacct.usage"); err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64); err == nil {
			return n
		}
	}
	if data, err := os.ReadFile("/sys/fs/cgroup/cpu.stat"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "usage_usec" {
				if n, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					return n * 1000
				}
			}
		}
	}
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1
	}
	fields := strings.Fields(strings.SplitN(string(data), "\n", 2)[0])
	if len(fields) < 8 || fields[0] != "cpu" {
		return -1
	}
	var ticks int64
	for _, i := range []int{1, 2, 3, 6, 7} { // user nice system irq softirq, in 1/100 s
		n, err := strconv.ParseInt(fields[i], 10, 64)
		if err != nil {
			return -1
		}
		ticks += n
	}
	return ticks * 10_000_000
}
