package main

import (
	"sort"
	"sync"
	"syscall"
	"time"
)

const (
	defaultLogBytes = 1 << 20
	keepExited      = 64
)

// ring keeps the last cap bytes of a process's output as chunks tagged with their stream.
type ring struct {
	cap    int64
	chunks []chunk
	size   int64
	end    int64 // bytes ever written; the ring holds [end-size, end)
}

type chunk struct {
	off    int64
	stream int
	data   []byte
}

func (r *ring) add(stream int, p []byte) {
	if len(p) == 0 {
		return
	}
	if int64(len(p)) >= r.cap { // p alone fills the ring
		for i := range r.chunks {
			r.chunks[i] = chunk{}
		}
		r.chunks, r.size = r.chunks[:0], 0
		r.end += int64(len(p)) - r.cap
		p = p[int64(len(p))-r.cap:]
	}
	// Merge into the last chunk when it is the same stream and small.
	if n := len(r.chunks); n > 0 && r.chunks[n-1].stream == stream && len(r.chunks[n-1].data)+len(p) <= 32*1024 {
		r.chunks[n-1].data = append(r.chunks[n-1].data, p...)
	} else {
		r.chunks = append(r.chunks, chunk{off: r.end, stream: stream, data: append([]byte(nil), p...)})
	}
	r.size += int64(len(p))
	r.end += int64(len(p))
	for r.size > r.cap {
		excess := r.size - r.cap
		first := &r.chunks[0]
		if int64(len(first.data)) <= excess {
			r.size -= int64(len(first.data))
			r.chunks[0] = chunk{}
			r.chunks = r.chunks[1:]
			continue
		}
		first.data = append([]byte(nil), first.data[excess:]...)
		first.off += excess
		r.size -= excess
	}
}

func (r *ring) start() int64 { return r.end - r.size }

// read returns a copy of the output at pos (at most max bytes of one chunk), the position
// after it, and whether pos had been overwritten (the reader skips ahead to the oldest byte).
func (r *ring) read(pos int64, max int) (stream int, data []byte, next int64, skipped bool) {
	if pos < r.start() {
		pos, skipped = r.start(), true
	}
	i := sort.Search(len(r.chunks), func(i int) bool {
		return r.chunks[i].off+int64(len(r.chunks[i].data)) > pos
	})
	if i == len(r.chunks) {
		return 0, nil, pos, skipped
	}
	ch := r.chunks[i]
	b := ch.data[pos-ch.off:]
	if len(b) > max {
		b = b[:max]
	}
	return ch.stream, append([]byte(nil), b...), pos + int64(len(b)), skipped
}

// spawned is a process started by spawn.
type spawned struct {
	pid       int
	argv      []string
	cwd       string
	user      string
	startedAt float64

	mu       sync.Mutex
	running  bool
	exitedAt time.Time
	code     int
	signal   *string
	outDone  int // output pipes closed (of 2)
	ring     ring
	changed  chan struct{} // closed and replaced at every change
}

func (p *spawned) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

type procTable struct {
	mu     sync.Mutex
	procs  map[int]*spawned
	exited []int // pids, oldest first
}

func newProcTable() *procTable { return &procTable{procs: map[int]*spawned{}} }

func (t *procTable) get(pid int) *spawned {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.procs[pid]
}

func (t *procTable) running() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, p := range t.procs {
		p.mu.Lock()
		if p.running {
			n++
		}
		p.mu.Unlock()
	}
	return n
}

func (t *procTable) exitedProc(pid int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.exited = append(t.exited, pid)
	for len(t.exited) > keepExited {
		old := t.exited[0]
		t.exited = t.exited[1:]
		if p := t.procs[old]; p != nil {
			p.mu.Lock()
			r := p.running
			p.mu.Unlock()
			if !r {
				delete(t.procs, old)
			}
		}
	}
}

func opSpawn(c *channel, r *request) error {
	p, err := prepare(r)
	if err != nil {
		return err
	}
	logBytes := r.LogBytes
	if logBytes <= 0 {
		logBytes = defaultLogBytes
	}
	pr, err := start(p, false, 0, 0, false)
	if err != nil {
		return err
	}
	user := r.User
	if user == "" {
		user = p.user.name
	}
	sp := &spawned{
		pid: pr.pid, argv: p.argv, cwd: p.cwd, user: user,
		startedAt: float64(time.Now().UnixNano()) / 1e9,
		running:   true, ring: ring{cap: logBytes}, changed: make(chan struct{}),
	}
	t := c.s.procs
	t.mu.Lock()
	t.procs[pr.pid] = sp
	t.mu.Unlock()
	c.s.log.Printf("spawn pid %d %q", pr.pid, p.argv)
	for i := 0; i < 2; i++ {
		stream, f := i, pr.out[i]
		go func() {
			buf := make([]byte, 32*1024)
			for {
				n, err := f.Read(buf)
				if n > 0 {
					sp.mu.Lock()
					sp.ring.add(stream, buf[:n])
					sp.notifyLocked()
					sp.mu.Unlock()
				}
				if err != nil {
					break
				}
			}
			f.Close()
			sp.mu.Lock()
			sp.outDone++
			sp.notifyLocked()
			sp.mu.Unlock()
		}()
	}
	go func() {
		_ = pr.cmd.Wait()
		code, sig := exitStatus(pr.cmd.ProcessState)
		sp.mu.Lock()
		sp.running, sp.code, sp.signal, sp.exitedAt = false, code, sig, time.Now()
		sp.notifyLocked()
		sp.mu.Unlock()
		t.exitedProc(sp.pid)
		c.s.log.Printf("spawned pid %d exited (%d)", sp.pid, code)
	}()
	c.ok(map[string]int{"pid": pr.pid})
	return nil
}

func opPs(c *channel, r *request) error {
	t := c.s.procs
	t.mu.Lock()
	list := make([]*spawned, 0, len(t.procs))
	for _, p := range t.procs {
		list = append(list, p)
	}
	t.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].startedAt < list[j].startedAt })
	out := make([]map[string]any, 0, len(list))
	for _, p := range list {
		p.mu.Lock()
		e := map[string]any{
			"pid": p.pid, "argv": p.argv, "cwd": p.cwd, "user": p.user, "started_at": p.startedAt,
			"running": p.running, "exit_code": nil, "signal": p.signal,
		}
		if !p.running {
			e["exit_code"] = p.code
		}
		p.mu.Unlock()
		out = append(out, e)
	}
	c.ok(map[string]any{"processes": out})
	return nil
}

func opSignal(c *channel, r *request) error {
	sig, ok := parseSignal(r.Signal)
	if !ok {
		return errf("invalid", "unknown signal %q", r.Signal)
	}
	p := c.s.procs.get(r.PID)
	if p == nil {
		return errf("not_found", "no process %d", r.PID)
	}
	p.mu.Lock()
	running := p.running
	p.mu.Unlock()
	if !running {
		return errf("not_found", "process %d has exited", r.PID)
	}
	if err := syscall.Kill(-p.pid, sig); err != nil && err != syscall.ESRCH {
		return errf("failed", "kill: %v", err)
	}
	c.ok(nil)
	return nil
}

func opLogs(c *channel, r *request) error {
	p := c.s.procs.get(r.PID)
	if p == nil {
		return errf("not_found", "no process %d", r.PID)
	}
	p.mu.Lock()
	pos := p.ring.start()
	stop := p.ring.end // without follow: what is there now
	// truncated in the exit: some output was not delivered (overwritten before it was read).
	skippedAny := pos > 0
	p.mu.Unlock()
	for {
		p.mu.Lock()
		if !r.Follow && pos >= stop {
			running := p.running
			p.mu.Unlock()
			c.sendEOF(0)
			c.sendEOF(1)
			c.ok(map[string]any{"running": running})
			return nil
		}
		stream, data, next, skipped := p.ring.read(pos, 32*1024)
		if !r.Follow && next > stop {
			cut := next - stop
			data = data[:int64(len(data))-cut]
			next = stop
		}
		finished := !p.running && (p.outDone == 2 || time.Since(p.exitedAt) > 100*time.Millisecond)
		changed := p.changed
		code, sig := p.code, p.signal
		p.mu.Unlock()
		skippedAny = skippedAny || skipped
		pos = next
		if len(data) > 0 {
			if !c.sendData(stream, data) {
				return nil // the host closed the channel
			}
			continue
		}
		if r.Follow && finished {
			c.sendEOF(0)
			c.sendEOF(1)
			c.msg(map[string]any{"exit": map[string]any{
				"code": code, "signal": sig, "timed_out": false, "truncated": skippedAny,
			}})
			return nil
		}
		select {
		case <-changed:
		case <-c.done:
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}
