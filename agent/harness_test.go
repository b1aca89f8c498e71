package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestMain: the test binary doubles as den-agent (for the subprocess tests), and points the
// user lookup at a throwaway passwd/group pair.
func TestMain(m *testing.M) {
	if os.Getenv("DEN_AGENT_TEST_MAIN") == "1" {
		os.Exit(realMain(os.Args[1:]))
	}
	dir, err := os.MkdirTemp("", "den-agent-users")
	if err != nil {
		panic(err)
	}
	passwd := "root:x:0:0:root:/root:/bin/sh\n" +
		"tuser:x:4242:4242:test:/tmp:/bin/sh\n" +
		"other:x:4343:4343:other:/tmp:/bin/sh\n"
	group := "root:x:0:\ntuser:x:4242:\nother:x:4343:\ntgroup:x:4444:tuser,someone\n"
	must(os.WriteFile(filepath.Join(dir, "passwd"), []byte(passwd), 0o644))
	must(os.WriteFile(filepath.Join(dir, "group"), []byte(group), 0o644))
	os.Setenv("DEN_AGENT_PASSWD", filepath.Join(dir, "passwd"))
	os.Setenv("DEN_AGENT_GROUP", filepath.Join(dir, "group"))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// client is the host side of the protocol, for tests.
type client struct {
	t     *testing.T
	wmu   sync.Mutex
	w     io.Writer
	mu    sync.Mutex
	chans map[uint32]*cchan
	hello chan map[string]any
	next  uint32
}

type cchan struct {
	c       *client
	id      uint32
	mu      sync.Mutex
	cond    *sync.Cond
	frames  []frame
	noGrant bool
	granted int64 // WINDOW credits received for stream 0
	sent    int64 // DATA bytes sent on stream 0
}

// dataFlow sends b on stream 0 within the agent's window, waiting for its grants.
func (ch *cchan) dataFlow(b []byte) {
	for len(b) > 0 {
		ch.mu.Lock()
		avail := initWindow + ch.granted - ch.sent
		ch.mu.Unlock()
		if avail <= 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		n := int64(len(b))
		if n > avail {
			n = avail
		}
		if n > 65536 {
			n = 65536
		}
		ch.mu.Lock()
		ch.sent += n
		ch.mu.Unlock()
		ch.data(b[:n])
		b = b[n:]
	}
}

// newTestClient runs an in-process server over pipes and says HELLO.
func newTestClient(t *testing.T) *client {
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	logger := log.New(io.Discard, "", 0)
	if testing.Verbose() {
		logger = log.New(os.Stderr, "agent: ", log.Lmicroseconds)
	}
	s := newServer(inR, outW, logger)
	go func() { _ = s.run() }()
	t.Cleanup(func() { inW.Close(); outR.Close() })
	c := startClient(t, inW, outR)
	c.sayHello("0123456789abcdef0123456789abcdef")
	return c
}

func startClient(t *testing.T, w io.Writer, r io.Reader) *client {
	c := &client{t: t, w: w, chans: map[uint32]*cchan{}, hello: make(chan map[string]any, 4), next: 1}
	go c.readLoop(r)
	return c
}

func (c *client) readLoop(r io.Reader) {
	fr := newFrameReader(r)
	for {
		f, err := fr.next()
		if err != nil {
			return
		}
		if f.typ == tHello {
			var m map[string]any
			_ = json.Unmarshal(f.payload, &m)
			c.hello <- m
			continue
		}
		c.mu.Lock()
		ch := c.chans[f.ch]
		c.mu.Unlock()
		if ch == nil {
			continue
		}
		ch.mu.Lock()
		if f.typ == tWindow && f.flags == 0 && len(f.payload) == 4 {
			ch.granted += int64(binary.BigEndian.Uint32(f.payload))
		}
		ch.frames = append(ch.frames, f)
		ch.cond.Broadcast()
		grant := !ch.noGrant
		ch.mu.Unlock()
		if f.typ == tData && grant {
			ch.window(int(f.flags), len(f.payload))
		}
	}
}

func (c *client) write(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.w.Write(b); err != nil {
		c.t.Errorf("write: %v", err)
	}
}

func (c *client) sayHello(nonce string) map[string]any {
	b, _ := json.Marshal(map[string]any{"v": 1, "nonce": nonce})
	c.write(encodeFrame(tHello, 0, 0, b))
	return c.waitHello(nonce)
}

func (c *client) waitHello(nonce string) map[string]any {
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-c.hello:
			if m["nonce"] == nonce {
				return m
			}
		case <-deadline:
			c.t.Fatalf("no HELLO reply for %s", nonce)
			return nil
		}
	}
}

func (c *client) open(req map[string]any) *cchan {
	return c.openOpts(req, false)
}

func (c *client) openRaw(payload []byte) *cchan {
	c.mu.Lock()
	id := c.next
	c.next++
	ch := &cchan{c: c, id: id}
	ch.cond = sync.NewCond(&ch.mu)
	c.chans[id] = ch
	c.mu.Unlock()
	c.write(encodeFrame(tOpen, 0, id, payload))
	return ch
}

func (c *client) openOpts(req map[string]any, noGrant bool) *cchan {
	c.mu.Lock()
	id := c.next
	c.next++
	ch := &cchan{c: c, id: id, noGrant: noGrant}
	ch.cond = sync.NewCond(&ch.mu)
	c.chans[id] = ch
	c.mu.Unlock()
	b, _ := json.Marshal(req)
	c.write(encodeFrame(tOpen, 0, id, b))
	return ch
}

func (ch *cchan) send(typ, flags uint8, payload []byte) {
	ch.c.write(encodeFrame(typ, flags, ch.id, payload))
}

func (ch *cchan) data(b []byte) { ch.send(tData, 0, b) }
func (ch *cchan) eof()          { ch.send(tEOF, 0, nil) }
func (ch *cchan) closeChan()    { ch.send(tClose, 0, nil) }
func (ch *cchan) msg(v any)     { b, _ := json.Marshal(v); ch.send(tMsg, 0, b) }
func (ch *cchan) window(stream, n int) {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(n))
	ch.send(tWindow, uint8(stream), b[:])
}

// nextFrame waits for the channel's next frame.
func (ch *cchan) nextFrame(timeout time.Duration) (frame, bool) {
	deadline := time.Now().Add(timeout)
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for len(ch.frames) == 0 {
		if time.Now().After(deadline) {
			return frame{}, false
		}
		ch.mu.Unlock()
		time.Sleep(2 * time.Millisecond)
		ch.mu.Lock()
	}
	f := ch.frames[0]
	ch.frames = ch.frames[1:]
	return f, true
}

// nextMsg skips nothing: it fails unless the next frame is a MSG.
func (ch *cchan) nextMsg(timeout time.Duration) map[string]any {
	ch.c.t.Helper()
	f, ok := ch.nextFrame(timeout)
	if !ok {
		ch.c.t.Fatalf("chan %d: no frame", ch.id)
	}
	if f.typ != tMsg {
		ch.c.t.Fatalf("chan %d: want MSG, got type %d %q", ch.id, f.typ, f.payload)
	}
	var m map[string]any
	if err := json.Unmarshal(f.payload, &m); err != nil {
		ch.c.t.Fatalf("bad MSG %q", f.payload)
	}
	return m
}

// result is everything a channel said until CLOSE.
type result struct {
	msgs   []map[string]any
	data   [2][]byte
	eof    [2]bool
	closed bool
	order  []string // "ok", "error", "started", "exit", "data0", "eof1", ...
}

func (r *result) last(key string) map[string]any {
	for i := len(r.msgs) - 1; i >= 0; i-- {
		if v, ok := r.msgs[i][key]; ok {
			m, _ := v.(map[string]any)
			return m
		}
	}
	return nil
}

func (r *result) errCode() string {
	if e := r.last("error"); e != nil {
		s, _ := e["code"].(string)
		return s
	}
	return ""
}

// collect reads the channel until CLOSE (failing after timeout).
func (ch *cchan) collect(timeout time.Duration) *result {
	ch.c.t.Helper()
	r := &result{}
	deadline := time.Now().Add(timeout)
	for {
		f, ok := ch.nextFrame(time.Until(deadline))
		if !ok {
			ch.c.t.Fatalf("chan %d: no CLOSE within %v; so far: %v, %q %q", ch.id, timeout, r.msgs, trunc(r.data[0]), trunc(r.data[1]))
		}
		s := int(f.flags & 1)
		switch f.typ {
		case tMsg:
			var m map[string]any
			if err := json.Unmarshal(f.payload, &m); err != nil {
				ch.c.t.Fatalf("bad MSG %q", f.payload)
			}
			r.msgs = append(r.msgs, m)
			for k := range m {
				r.order = append(r.order, k)
			}
		case tData:
			r.data[s] = append(r.data[s], f.payload...)
			if n := len(r.order); n == 0 || r.order[n-1] != fmt.Sprintf("data%d", s) {
				r.order = append(r.order, fmt.Sprintf("data%d", s))
			}
		case tEOF:
			if r.eof[s] {
				ch.c.t.Errorf("chan %d: second EOF on stream %d", ch.id, s)
			}
			r.eof[s] = true
			r.order = append(r.order, fmt.Sprintf("eof%d", s))
		case tClose:
			r.closed = true
			return r
		}
	}
}

func trunc(b []byte) []byte {
	if len(b) > 200 {
		return b[:200]
	}
	return b
}

// call opens a channel with req and collects it.
func (c *client) call(req map[string]any) *result {
	c.t.Helper()
	return c.open(req).collect(10 * time.Second)
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
