package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestHelloAndPing(t *testing.T) {
	c := newTestClient(t)
	h := c.sayHello("aaaa")
	if h["v"] != float64(1) || h["version"] != version || h["boot"] == "" || h["pid"] != float64(os.Getpid()) {
		t.Fatalf("bad HELLO reply %v", h)
	}
	r := c.call(map[string]any{"op": "ping"})
	if len(r.msgs) != 1 || r.last("ok") == nil || !r.closed {
		t.Fatalf("ping: %v", r.msgs)
	}
	r = c.call(map[string]any{"op": "nope"})
	if r.errCode() != "invalid" {
		t.Fatalf("unknown op: %v", r.msgs)
	}
}

func TestResyncAfterGarbage(t *testing.T) {
	c := newTestClient(t)
	// Garbage, including a fake magic and a HELLO-looking header with bad JSON.
	junk := []byte("garbage\xd3\x4e\x01\x00")
	junk = append(junk, encodeFrame(tHello, 0, 0, []byte("{not json"))...)
	junk = append(junk, 0xD3)
	c.write(junk)
	c.sayHello("bbbb")
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping after resync: %v", r.msgs)
	}
	// A frame longer than the maximum: resync.
	hdr := encodeFrame(tOpen, 0, 5, nil)
	binary.BigEndian.PutUint32(hdr[8:], maxPayload+1)
	c.write(hdr)
	c.write(bytes.Repeat([]byte{1}, 1000))
	c.sayHello("cccc")
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping after resync: %v", r.msgs)
	}
}

func TestResyncAfterTruncatedFrame(t *testing.T) {
	c := newTestClient(t)
	// A frame that claims 1000 bytes but has 10: the host's recovery (256 KiB + 16 zero bytes,
	// then HELLO) completes it and the agent falls back to scanning.
	hdr := encodeFrame(tOpen, 0, 9, nil)
	binary.BigEndian.PutUint32(hdr[8:], 1000)
	c.write(append(hdr, []byte("0123456789")...))
	c.write(make([]byte, 256*1024+16))
	c.sayHello("dddd")
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping after resync: %v", r.msgs)
	}
}

var testEnv = map[string]any{"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C"}

func execReq(argv ...string) map[string]any {
	return map[string]any{"op": "exec", "argv": argv, "env": testEnv, "cwd": "/tmp", "user": "root"}
}

func exitOf(t *testing.T, r *result) map[string]any {
	t.Helper()
	e := r.last("exit")
	if e == nil {
		t.Fatalf("no exit: %v (%q %q)", r.msgs, r.data[0], r.data[1])
	}
	return e
}

func TestExecBasics(t *testing.T) {
	c := newTestClient(t)
	r := c.call(execReq("echo", "hi"))
	if r.last("started") == nil || string(r.data[0]) != "hi\n" || !r.eof[0] || !r.eof[1] {
		t.Fatalf("echo: %v %q", r.msgs, r.data[0])
	}
	if e := exitOf(t, r); e["code"] != float64(0) || e["signal"] != nil || e["timed_out"] != false {
		t.Fatalf("echo exit: %v", e)
	}
	if r.order[0] != "started" || r.order[len(r.order)-1] != "exit" {
		t.Fatalf("order: %v", r.order)
	}

	r = c.call(execReq("sh", "-c", "echo out; echo err >&2; exit 3"))
	if string(r.data[0]) != "out\n" || string(r.data[1]) != "err\n" || exitOf(t, r)["code"] != float64(3) {
		t.Fatalf("exit 3: %v %q %q", r.msgs, r.data[0], r.data[1])
	}

	// Exactly the env given.
	r = c.call(execReq("env"))
	if got := strings.Fields(string(r.data[0])); len(got) != 3 || got[0] != "HOME=/tmp" {
		t.Fatalf("env: %q", r.data[0])
	}

	// Runs as the user, in cwd.
	req := execReq("sh", "-c", "id -u; id -G; pwd")
	req["user"], req["cwd"] = "tuser", "/"
	r = c.call(req)
	if string(r.data[0]) != "4242\n4242 4444\n/\n" {
		t.Fatalf("id: %q %q", r.data[0], r.data[1])
	}

	// Killed by a signal.
	r = c.call(execReq("sh", "-c", "kill -KILL $$"))
	if e := exitOf(t, r); e["code"] != float64(137) || e["signal"] != "KILL" {
		t.Fatalf("kill: %v", e)
	}
}

func TestExecErrors(t *testing.T) {
	c := newTestClient(t)
	dir := t.TempDir()
	os.WriteFile(dir+"/noexec", []byte("#!/bin/sh\n"), 0o644)
	cases := []struct {
		req  map[string]any
		code string
	}{
		{execReq("no-such-command-xyz"), "enoent"},
		{execReq("/no/such/file"), "enoent"},
		{execReq(dir), "eacces"},
		{execReq(dir + "/noexec"), "eacces"},
		{func() map[string]any { r := execReq("true"); r["cwd"] = "/no/such/dir"; return r }(), "bad_cwd"},
		{func() map[string]any { r := execReq("true"); r["cwd"] = dir + "/noexec"; return r }(), "bad_cwd"},
		{func() map[string]any { r := execReq("true"); r["user"] = "nobody-here"; return r }(), "no_user"},
		{map[string]any{"op": "exec", "argv": []string{}}, "invalid"},
	}
	for _, tc := range cases {
		r := c.call(tc.req)
		if r.errCode() != tc.code || r.last("started") != nil {
			t.Errorf("%v: want %s, got %v", tc.req["argv"], tc.code, r.msgs)
		}
	}
	// PATH lookup skips a non-executable match, like execvp.
	os.WriteFile(dir+"/true", []byte("#!/bin/sh\n"), 0o644)
	req := execReq("true")
	req["env"] = map[string]any{"PATH": dir + ":/bin:/usr/bin"}
	if r := c.call(req); exitOf(t, r)["code"] != float64(0) {
		t.Errorf("PATH skip: %v", r.msgs)
	}
	// An empty PATH is the working directory only (as for a shell), not the default.
	req = execReq("true")
	req["env"] = map[string]any{"PATH": ""}
	req["cwd"] = "/"
	if r := c.call(req); r.errCode() != "enoent" {
		t.Errorf("empty PATH: want enoent, got %v", r.msgs)
	}
}

func TestExecStdin(t *testing.T) {
	c := newTestClient(t)
	req := execReq("cat")
	req["stdin"] = true
	ch := c.open(req)
	if m := ch.nextMsg(5 * time.Second); m["started"] == nil {
		t.Fatalf("want started, got %v", m)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 64*1024) // 1 MiB: needs WINDOW grants
	ch.dataFlow(big)
	ch.eof()
	r := ch.collect(10 * time.Second)
	if !bytes.Equal(r.data[0], big) {
		t.Fatalf("cat: got %d bytes, want %d", len(r.data[0]), len(big))
	}
	if exitOf(t, r)["code"] != float64(0) {
		t.Fatalf("cat exit %v", r.msgs)
	}
}

func TestExecTTY(t *testing.T) {
	c := newTestClient(t)
	req := execReq("stty", "size")
	req["tty"], req["cols"], req["rows"] = true, 100, 30
	r := c.call(req)
	if strings.TrimSpace(string(r.data[0])) != "30 100" || r.eof[1] {
		t.Fatalf("stty size: %q %v", r.data[0], r.order)
	}
	req = execReq("sh", "-c", "test -t 0 && test -t 1 && test -t 2 && echo tty; read x; stty size")
	req["tty"], req["cols"], req["rows"], req["stdin"] = true, 80, 24, true
	ch := c.open(req)
	if m := ch.nextMsg(5 * time.Second); m["started"] == nil {
		t.Fatalf("want started, got %v", m)
	}
	ch.msg(map[string]any{"resize": map[string]int{"cols": 132, "rows": 43}})
	ch.data([]byte("go\n"))
	r = ch.collect(10 * time.Second)
	if !strings.Contains(string(r.data[0]), "tty") || !strings.Contains(string(r.data[0]), "43 132") {
		t.Fatalf("resize: %q", r.data[0])
	}
}

func TestExecTimeout(t *testing.T) {
	c := newTestClient(t)
	req := execReq("yes")
	req["timeout_ms"] = 300
	t0 := time.Now()
	r := c.call(req)
	e := exitOf(t, r)
	if e["timed_out"] != true || e["signal"] != "TERM" || e["code"] != float64(143) {
		t.Fatalf("timeout: %v", e)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	// A process that ignores SIGTERM gets SIGKILL 2 s later.
	req = execReq("sh", "-c", "trap '' TERM; while :; do sleep 0.05; done")
	req["timeout_ms"] = 100
	t0 = time.Now()
	r = c.call(req)
	if e := exitOf(t, r); e["timed_out"] != true || e["signal"] != "KILL" {
		t.Fatalf("timeout kill: %v", e)
	}
	if d := time.Since(t0); d < 2*time.Second || d > 4*time.Second {
		t.Fatalf("SIGKILL after %v", d)
	}
}

func TestExecMaxOutput(t *testing.T) {
	c := newTestClient(t)
	req := execReq("sh", "-c", "yes | head -c 5000000; yes err | head -c 10 >&2")
	req["max_output"] = 1000
	r := c.call(req)
	e := exitOf(t, r)
	if len(r.data[0]) != 1000 || string(r.data[1]) != "err\nerr\ner" || e["truncated"] != true || e["code"] != float64(0) {
		t.Fatalf("max_output: %d %q %v", len(r.data[0]), r.data[1], e)
	}
	req = execReq("yes")
	req["max_output"], req["timeout_ms"] = 1000, 500
	r = c.call(req)
	if e := exitOf(t, r); len(r.data[0]) != 1000 || e["truncated"] != true || e["timed_out"] != true {
		t.Fatalf("yes max_output: %d %v", len(r.data[0]), e)
	}
}

func TestExecBackgroundChild(t *testing.T) {
	c := newTestClient(t)
	t0 := time.Now()
	ch := c.open(execReq("sh", "-c", "sleep 5 & echo hi"))
	started := ch.nextMsg(5 * time.Second)["started"].(map[string]any)
	r := ch.collect(5 * time.Second)
	defer syscall.Kill(-int(started["pid"].(float64)), syscall.SIGKILL)
	if d := time.Since(t0); d > time.Second {
		t.Fatalf("background child held the exec for %v", d)
	}
	if string(r.data[0]) != "hi\n" || !r.eof[0] || !r.eof[1] || exitOf(t, r)["code"] != float64(0) {
		t.Fatalf("background: %q %v", r.data[0], r.order)
	}
}

func TestExecSignalAndClose(t *testing.T) {
	c := newTestClient(t)
	ch := c.open(execReq("sleep", "30"))
	ch.nextMsg(5 * time.Second)
	ch.msg(map[string]any{"signal": "INT"})
	r := ch.collect(5 * time.Second)
	if e := exitOf(t, r); e["signal"] != "INT" || e["code"] != float64(130) {
		t.Fatalf("signal: %v", e)
	}
	// A host CLOSE kills the group; nothing more is answered.
	ch = c.open(execReq("sleep", "30"))
	pid := int(ch.nextMsg(5 * time.Second)["started"].(map[string]any)["pid"].(float64))
	ch.closeChan()
	waitGone(t, pid)
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 300; i++ {
		if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d still there", pid)
}

func TestFlowControl(t *testing.T) {
	c := newTestClient(t)
	ch := c.openOpts(execReq("yes"), true)
	count := func() int {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		n := 0
		for _, f := range ch.frames {
			if f.typ == tData {
				n += len(f.payload)
			}
		}
		return n
	}
	settle := func() int {
		last := -1
		for i := 0; i < 100; i++ {
			time.Sleep(20 * time.Millisecond)
			n := count()
			if n == last && n > 0 {
				return n
			}
			last = n
		}
		return last
	}
	if n := settle(); n != initWindow {
		t.Fatalf("without WINDOW: got %d bytes, want %d", n, initWindow)
	}
	// Other channels keep flowing meanwhile.
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping while blocked: %v", r.msgs)
	}
	ch.window(0, 1000)
	if n := settle(); n != initWindow+1000 {
		t.Fatalf("after WINDOW 1000: got %d", n)
	}
	pid := 0
	ch.mu.Lock()
	for _, f := range ch.frames {
		if f.typ == tMsg && bytes.Contains(f.payload, []byte("started")) {
			var m map[string]map[string]float64
			_ = jsonUnmarshal(f.payload, &m)
			pid = int(m["started"]["pid"])
		}
	}
	ch.mu.Unlock()
	ch.closeChan()
	waitGone(t, pid)
}

func TestNewSessionLeavesNonTTYExecs(t *testing.T) {
	c := newTestClient(t)
	ch := c.open(execReq("sleep", "30"))
	pid := int(ch.nextMsg(5 * time.Second)["started"].(map[string]any)["pid"].(float64))
	req := execReq("sleep", "30")
	req["tty"] = true
	tch := c.open(req)
	tpid := int(tch.nextMsg(5 * time.Second)["started"].(map[string]any)["pid"].(float64))
	if r := c.call(map[string]any{"op": "status"}); r.last("ok")["sessions"] != float64(2) {
		t.Fatalf("status: %v", r.msgs)
	}
	c.sayHello("eeee")
	waitGone(t, tpid)
	time.Sleep(100 * time.Millisecond)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("non-TTY exec was killed by the new session: %v", err)
	}
	syscall.Kill(-pid, syscall.SIGKILL)
	waitGone(t, pid)
	if r := c.call(map[string]any{"op": "status"}); r.last("ok")["sessions"] != float64(0) {
		t.Fatalf("status: %v", r.msgs)
	}
}

// The real binary's serve over pipes, as a subprocess.
func TestServeSubprocess(t *testing.T) {
	cmd := exec.Command(os.Args[0], "serve")
	cmd.Env = append(os.Environ(), "DEN_AGENT_TEST_MAIN=1", "DEN_AGENT_STDIO=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := startClient(t, stdin, stdout)
	stdin.Write([]byte("left over from an earlier session\xd3\x4e"))
	h := c.sayHello("ffff")
	if h["pid"] != float64(cmd.Process.Pid) {
		t.Fatalf("hello: %v", h)
	}
	if r := c.call(execReq("echo", "sub")); string(r.data[0]) != "sub\n" {
		t.Fatalf("exec: %q", r.data[0])
	}
	// The end of its input (the host's attach gone: a checkpoint, Den restarting) does not
	// end serve: it keeps its processes and waits for the next session.
	stdin.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("serve exited at the end of its input: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	cmd.Process.Kill()
	<-done
}

// init starts serve with its own stdio, restarts it, and exits on SIGTERM.
func TestInit(t *testing.T) {
	dir := t.TempDir()
	script := dir + "/den-init"
	os.WriteFile(script, []byte("#!/bin/sh\necho started >> "+dir+"/log\nexec sleep 1000\n"), 0o755)
	cmd := exec.Command(os.Args[0], "init", "--", script)
	cmd.Env = append(os.Environ(), "DEN_AGENT_TEST_MAIN=1", "DEN_AGENT_STDIO=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	c := startClient(t, stdin, stdout)
	h := c.sayHello("1111")
	servePid := int(h["pid"].(float64))
	if servePid == cmd.Process.Pid {
		t.Fatalf("serve is init")
	}
	// An orphan: init reaps it (no zombie left behind).
	r := c.call(execReq("sh", "-c", "sleep 0.2 & echo $!"))
	orphan, _ := strconv.Atoi(strings.TrimSpace(string(r.data[0])))
	time.Sleep(1500 * time.Millisecond)
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", orphan)); err == nil {
		t.Fatalf("orphan %d not reaped: %s", orphan, b)
	}
	// serve restarts after it dies.
	syscall.Kill(servePid, syscall.SIGKILL)
	time.Sleep(500 * time.Millisecond)
	h = c.sayHello("2222")
	if int(h["pid"].(float64)) == servePid {
		t.Fatalf("serve not restarted")
	}
	b, _ := os.ReadFile(dir + "/log")
	if string(b) != "started\n" {
		t.Fatalf("image init: %q", b)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(4 * time.Second):
		t.Fatal("init did not exit on SIGTERM")
	}
}

func TestPanicInOneChannel(t *testing.T) {
	ops["test-panic"] = func(c *channel, r *request) error { panic("boom") }
	defer delete(ops, "test-panic")
	c := newTestClient(t)
	r := c.call(map[string]any{"op": "test-panic"})
	if r.errCode() != "failed" || !r.closed {
		t.Fatalf("panic: %v", r.msgs)
	}
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping after a panic: %v", r.msgs)
	}
	// Bad requests never crash serve either: each is answered with an error.
	for _, p := range []string{`[]`, `{"op": 5}`, `{"op": "exec", "argv": "x"}`, `{"op": "read", "path": "/etc/passwd"}`,
		`{"op": "exec", "argv": ["true"], "env": {"A=B": "c"}}`, `{"op": "signal", "pid": 1, "signal": "NOPE"}`, `{"op": "spawn"}`} {
		if r := c.openRaw([]byte(p)).collect(5 * time.Second); r.errCode() != "invalid" {
			t.Errorf("%s: %v", p, r.msgs)
		}
	}
	if r := c.call(map[string]any{"op": "ping"}); r.last("ok") == nil {
		t.Fatalf("ping after bad requests: %v", r.msgs)
	}
}

// An idle init sleeps until a signal: no tick (each wakeup costs the host CPU under gVisor).
func TestInitSleepsWhenIdle(t *testing.T) {
	dir := t.TempDir()
	script := dir + "/den-init"
	os.WriteFile(script, []byte("#!/bin/sh\nexec sleep 1000\n"), 0o755)
	cmd := exec.Command(os.Args[0], "init", "--", script)
	cmd.Env = append(os.Environ(), "DEN_AGENT_TEST_MAIN=1", "DEN_AGENT_STDIO=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	c := startClient(t, stdin, stdout)
	c.sayHello("1111") // serve and the image's init are up
	switches := func() int {
		total := 0
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", cmd.Process.Pid))
		for _, f := range tasks {
			b, _ := os.ReadFile(f)
			for _, line := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(line, "voluntary_ctxt_switches:") {
					n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "voluntary_ctxt_switches:")))
					total += n
				}
			}
		}
		return total
	}
	time.Sleep(500 * time.Millisecond) // let the start settle
	before := switches()
	time.Sleep(3 * time.Second)
	if woke := switches() - before; woke > 2 {
		t.Fatalf("an idle init woke %d times in 3 s", woke)
	}
}

// An agent started with SIGINT, SIGQUIT and SIGHUP ignored (a shell's trap with an empty
// action, as nohup or a background job leaves them) still starts its processes with them at
// their default action.
func TestExecSignalsNotInheritedIgnored(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", `trap '' INT QUIT HUP; exec "$0" serve`, os.Args[0])
	cmd.Env = append(os.Environ(), "DEN_AGENT_TEST_MAIN=1", "DEN_AGENT_STDIO=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	c := startClient(t, stdin, stdout)
	c.sayHello("ffff")
	for _, sig := range []string{"INT", "QUIT", "HUP"} {
		ch := c.open(execReq("sleep", "30"))
		ch.nextMsg(5 * time.Second)
		ch.msg(map[string]any{"signal": sig})
		r := ch.collect(5 * time.Second)
		if e := exitOf(t, r); e["signal"] != sig {
			t.Fatalf("signal %s: %v", sig, e)
		}
	}
}

// A process that writes as fast as it can (head: 8 KiB writes) reaches the host in large
// frames: the reader gathers what the pipe holds instead of one frame per write (under gVisor
// each read costs more than its bytes).
func TestExecOutputGathered(t *testing.T) {
	c := newTestClient(t)
	const size = 4 << 20
	ch := c.open(execReq("head", "-c", fmt.Sprint(size), "/dev/zero"))
	got, frames := 0, 0
	for closed := false; !closed; {
		f, ok := ch.nextFrame(10 * time.Second)
		if !ok {
			t.Fatalf("no frame after %d bytes", got)
		}
		switch {
		case f.typ == tData && f.flags&1 == 0:
			got += len(f.payload)
			frames++
		case f.typ == tClose:
			closed = true
		}
	}
	if got != size || frames == 0 || got/frames < 32<<10 {
		t.Fatalf("%d bytes in %d DATA frames: want %d in pieces of 32 KiB or more on average",
			got, frames, size)
	}
	r := c.call(execReq("sh", "-c", "echo one; sleep 0.1; echo two"))
	if string(r.data[0]) != "one\ntwo\n" {
		t.Fatalf("lines: %q", r.data[0])
	}
}

func TestGrowPipe(t *testing.T) {
	r, w, err := os.Pipe()
	must(err)
	defer r.Close()
	defer w.Close()
	growPipe(r)
	size, _, errno := syscall.Syscall(syscall.SYS_FCNTL, r.Fd(), 1032 /* F_GETPIPE_SZ */, 0)
	if errno != 0 || size != outPipeBytes {
		t.Fatalf("pipe size %d (%v), want %d", size, errno, outPipeBytes)
	}
}

// The stdin of a non-terminal exec gets a window of stdinWindow at once (bulk input is not
// held up by a grant's round trip per 256 KiB); a terminal's keeps the protocol's.
func TestExecStdinWindow(t *testing.T) {
	c := newTestClient(t)
	req := execReq("cat")
	req["stdin"] = true
	ch := c.openOpts(req, true)
	deadline := time.Now().Add(5 * time.Second)
	for {
		ch.mu.Lock()
		granted := ch.granted
		ch.mu.Unlock()
		if granted == stdinWindow-initWindow {
			break
		}
		if granted > stdinWindow-initWindow || time.Now().After(deadline) {
			t.Fatalf("stdin window: granted %d, want %d", granted, stdinWindow-initWindow)
		}
		time.Sleep(2 * time.Millisecond)
	}
	ch.closeChan()

	req = execReq("echo", "hi")
	req["stdin"], req["tty"] = true, true
	tty := c.open(req)
	if r := tty.collect(10 * time.Second); !bytes.Contains(r.data[0], []byte("hi")) {
		t.Fatalf("tty echo: %q", r.data[0])
	}
	tty.mu.Lock()
	defer tty.mu.Unlock()
	if tty.granted != 0 {
		t.Fatalf("a terminal's stdin got %d more", tty.granted)
	}
}
