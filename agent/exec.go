package main

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// prepared is a checked exec/spawn request: who, where, what.
type prepared struct {
	user *userInfo
	cwd  string
	path string
	argv []string
	env  []string
}

func prepare(r *request) (*prepared, error) {
	if len(r.Argv) == 0 || r.Argv[0] == "" {
		return nil, errf("invalid", "argv is empty")
	}
	u := lookupUser(r.User)
	if u == nil {
		return nil, errf("no_user", "no user %q", r.User)
	}
	cwd := r.Cwd
	if cwd == "" {
		cwd = u.home
		if cwd == "" {
			cwd = "/"
		}
	}
	if !filepath.IsAbs(cwd) {
		return nil, errf("bad_cwd", "cwd %q is not absolute", cwd)
	}
	st, err := os.Stat(cwd)
	if err != nil {
		return nil, errf("bad_cwd", "cwd %s: %v", cwd, err)
	}
	if !st.IsDir() {
		return nil, errf("bad_cwd", "cwd %s is not a directory", cwd)
	}
	env := make([]string, 0, len(r.Env)) // never nil: exec.Cmd would use the agent's env
	for k, v := range r.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			return nil, errf("invalid", "bad environment variable %q", k)
		}
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	for _, a := range r.Argv {
		if strings.Contains(a, "\x00") {
			return nil, errf("invalid", "argv contains a NUL byte")
		}
	}
	pathEnv, pathSet := r.Env["PATH"]
	if !pathSet {
		pathEnv = "/bin:/usr/bin"
	}
	path, err := lookPath(r.Argv[0], pathEnv, cwd, u)
	if err != nil {
		return nil, err
	}
	return &prepared{user: u, cwd: cwd, path: path, argv: r.Argv, env: env}, nil
}

// lookPath finds argv[0] like execvp: as is when it contains a slash, else in pathEnv (the
// request's PATH; "/bin:/usr/bin" when unset), checking the bits as the user would. An empty
// element, and so an empty PATH, means the working directory, as in a shell.
func lookPath(name, pathEnv, cwd string, u *userInfo) (string, error) {
	abs := func(p string) string {
		if !filepath.IsAbs(p) {
			return filepath.Join(cwd, p)
		}
		return p
	}
	if strings.Contains(name, "/") {
		p := abs(name)
		return p, checkExec(p, name, u)
	}
	var denied error
	for _, dir := range strings.Split(pathEnv, ":") {
		if dir == "" {
			dir = "."
		}
		p := abs(filepath.Join(dir, name))
		err := checkExec(p, name, u)
		if err == nil {
			return p, nil
		}
		if e, ok := err.(*opError); ok && e.code == "eacces" && denied == nil {
			denied = err
		}
	}
	if denied != nil {
		return "", denied
	}
	return "", errf("enoent", "%s: command not found", name)
}

func checkExec(p, name string, u *userInfo) error {
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		if err == syscall.EACCES {
			return errf("eacces", "%s: permission denied", name)
		}
		return errf("enoent", "%s: not found", name)
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return errf("eacces", "%s: is a directory", name)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG || !u.can(&st, permX) {
		return errf("eacces", "%s: permission denied", name)
	}
	return nil
}

// proc is a started process and the agent's ends of its stdio.
type proc struct {
	cmd    *exec.Cmd
	pid    int
	out    [2]*os.File // stdout, stderr (a TTY: the master as stdout, no stderr)
	stdinW *os.File    // nil without stdin
	ptm    *os.File    // the terminal's master, for a TTY
}

func startErr(err error, name string) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.ENOENT:
			return errf("enoent", "%s: %v", name, err)
		case syscall.EACCES, syscall.ENOEXEC, syscall.EISDIR, syscall.EPERM:
			if errno == syscall.EPERM {
				break
			}
			return errf("eacces", "%s: %v", name, err)
		}
	}
	return errf("failed", "start %s: %v", name, err)
}

// start starts the prepared process: a TTY in a new session with the terminal as its
// controlling terminal, otherwise in a new process group with pipes (stdin /dev/null unless
// withStdin).
func start(p *prepared, tty bool, cols, rows int, withStdin bool) (*proc, error) {
	defaultSignalsForChildren()
	attr := p.user.credential()
	cmd := &exec.Cmd{Path: p.path, Args: p.argv, Env: p.env, Dir: p.cwd, SysProcAttr: attr}
	pr := &proc{cmd: cmd}
	var closeAfter []*os.File
	cleanup := func() {
		for _, f := range closeAfter {
			f.Close()
		}
	}
	if tty {
		m, s, err := openPTY()
		if err != nil {
			return nil, errf("failed", "pty: %v", err)
		}
		if err := setWinsize(m, cols, rows); err != nil {
			m.Close()
			s.Close()
			return nil, errf("failed", "pty size: %v", err)
		}
		closeAfter = append(closeAfter, s)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = s, s, s
		attr.Setsid, attr.Setctty, attr.Ctty = true, true, 0
		pr.ptm = m
		pr.out[0] = m
	} else {
		attr.Setpgid = true
		for i := 0; i < 2; i++ {
			r, w, err := os.Pipe()
			if err != nil {
				cleanup()
				return nil, errf("failed", "pipe: %v", err)
			}
			closeAfter = append(closeAfter, w)
			growPipe(r)
			pr.out[i] = r
			if i == 0 {
				cmd.Stdout = w
			} else {
				cmd.Stderr = w
			}
		}
		if withStdin {
			r, w, err := os.Pipe()
			if err != nil {
				cleanup()
				pr.out[0].Close()
				pr.out[1].Close()
				return nil, errf("failed", "pipe: %v", err)
			}
			closeAfter = append(closeAfter, r)
			cmd.Stdin = r
			pr.stdinW = w
		}
	}
	if err := cmd.Start(); err != nil {
		cleanup()
		for _, f := range []*os.File{pr.out[0], pr.out[1], pr.stdinW} {
			if f != nil {
				f.Close()
			}
		}
		return nil, startErr(err, p.argv[0])
	}
	cleanup()
	pr.pid = cmd.Process.Pid
	return pr, nil
}

// A pipe's output is read in large pieces: under gVisor every wakeup of a reader by a writer
// costs far more than the bytes (128 MiB through a pipe took the sandbox 2.1 s of CPU in
// 8 KiB writes and reads, 0.3 s in 256 KiB ones; a streamed `head -c 128M /dev/zero` went from
// 12 to 24-29 MB/s with the two measures below, docs/benchmarks.md). The pipe is made large;
// after a read of at least gatherAfter bytes (a process writing as fast as it can: stdio
// flushes 4-8 KiB at a time) the reader's buffer grows to outReadBytes, and when a read did
// not fill it the reader lets the pipe fill for gatherDelay before it reads again. A smaller
// read (a line of interactive output) is followed by the next read at once, a short command
// never grows its buffer, and a terminal's output is never held.
const (
	outReadBytes = 256 * 1024
	outPipeBytes = 1024 * 1024
	gatherAfter  = 4096
	gatherDelay  = time.Millisecond
	stdinWindow  = 1024 * 1024 // what the host may send ahead into a non-terminal's stdin
)

// growPipe asks for a pipe of outPipeBytes (F_SETPIPE_SZ; best effort: the default stays when
// refused), so that a process writing fast fills it while the reader gathers.
func growPipe(f *os.File) {
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			syscall.Syscall(syscall.SYS_FCNTL, fd, 1031 /* F_SETPIPE_SZ */, outPipeBytes)
		})
	}
}

var signalNames = map[string]syscall.Signal{
	"HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "QUIT": syscall.SIGQUIT, "ILL": syscall.SIGILL,
	"TRAP": syscall.SIGTRAP, "ABRT": syscall.SIGABRT, "BUS": syscall.SIGBUS, "FPE": syscall.SIGFPE,
	"KILL": syscall.SIGKILL, "USR1": syscall.SIGUSR1, "SEGV": syscall.SIGSEGV, "USR2": syscall.SIGUSR2,
	"PIPE": syscall.SIGPIPE, "ALRM": syscall.SIGALRM, "TERM": syscall.SIGTERM, "CHLD": syscall.SIGCHLD,
	"CONT": syscall.SIGCONT, "STOP": syscall.SIGSTOP, "TSTP": syscall.SIGTSTP, "TTIN": syscall.SIGTTIN,
	"TTOU": syscall.SIGTTOU, "URG": syscall.SIGURG, "XCPU": syscall.SIGXCPU, "XFSZ": syscall.SIGXFSZ,
	"VTALRM": syscall.SIGVTALRM, "PROF": syscall.SIGPROF, "WINCH": syscall.SIGWINCH, "IO": syscall.SIGIO,
	"PWR": syscall.SIGPWR, "SYS": syscall.SIGSYS, "STKFLT": syscall.SIGSTKFLT,
}

func parseSignal(name string) (syscall.Signal, bool) {
	s, ok := signalNames[strings.TrimPrefix(strings.ToUpper(name), "SIG")]
	return s, ok
}

func signalName(sig syscall.Signal) string {
	for n, s := range signalNames {
		if s == sig {
			return n
		}
	}
	return "SIG" + strings.TrimPrefix(sig.String(), "signal ")
}

// exitStatus turns a wait status into the protocol's code and signal.
func exitStatus(ps *os.ProcessState) (int, *string) {
	if ps == nil {
		return -1, nil
	}
	ws, ok := ps.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		n := signalName(ws.Signal())
		return 128 + int(ws.Signal()), &n
	}
	return ps.ExitCode(), nil
}

func killGroup(pgid int, sig syscall.Signal) {
	if pgid > 0 {
		_ = syscall.Kill(-pgid, sig)
	}
}

func opExec(c *channel, r *request) error {
	p, err := prepare(r)
	if err != nil {
		return err
	}
	pr, err := start(p, r.TTY, r.Cols, r.Rows, r.Stdin && !r.TTY)
	if err != nil {
		return err
	}
	pgid := pr.pid
	c.s.log.Printf("chan %d: exec pid %d %q", c.id, pr.pid, p.argv)

	c.setOnMsg(func(m map[string]json.RawMessage) {
		if raw, ok := m["signal"]; ok {
			var name string
			if json.Unmarshal(raw, &name) == nil {
				if sig, ok := parseSignal(name); ok {
					killGroup(pgid, sig)
				}
			}
		}
		if raw, ok := m["resize"]; ok && pr.ptm != nil {
			// A resize that does not take is logged (Den's log shows the agent's): a lost
			// window change was seen in full test runs and never explained.
			var sz struct{ Cols, Rows int }
			if err := json.Unmarshal(raw, &sz); err != nil {
				c.s.log.Printf("chan %d: resize ignored: %v", c.id, err)
			} else if err := setWinsize(pr.ptm, sz.Cols, sz.Rows); err != nil {
				c.s.log.Printf("chan %d: resize to %dx%d failed: %v", c.id, sz.Cols, sz.Rows, err)
			} else {
				// gVisor does not signal the terminal's foreground group on a size change
				// made on the master side (a tmux client then never redraws): do it here.
				fg := foregroundGroup(pr.ptm)
				if fg <= 0 {
					fg = pgid
				}
				killGroup(fg, syscall.SIGWINCH)
			}
		}
	})
	c.setOnClose(func(sessionEnd bool) {
		if pr.ptm != nil {
			killGroup(pgid, syscall.SIGHUP)
			killGroup(pgid, syscall.SIGKILL)
		} else if !sessionEnd {
			killGroup(pgid, syscall.SIGKILL)
		}
		// A non-TTY exec of an ended session runs on, its output discarded.
	})
	c.msg(map[string]any{"started": map[string]int{"pid": pr.pid}})
	return runExec(c, r, pr, pgid)
}

// runExec pumps the exec's stdio until the process has exited and its output is done (or
// detached after the grace period), then answers exit.
func runExec(c *channel, r *request, pr *proc, pgid int) error {
	var (
		mu        sync.Mutex
		exited    bool
		timedOut  bool
		truncated bool
	)
	// stdin: the host's DATA into the process, a WINDOW grant per chunk written.
	var stdinSink *os.File
	if r.Stdin {
		if pr.ptm != nil {
			stdinSink = pr.ptm
		} else {
			stdinSink = pr.stdinW
		}
	}
	if stdinSink != nil && c.in[0] != nil {
		q := c.in[0]
		tty := pr.ptm != nil
		if !tty {
			// Input in bulk (`ssh ws 'cat > f' < big`): a large pipe, and the host may send a
			// wider window ahead, so that it is rarely waiting on a grant's round trip.
			growPipe(stdinSink)
			c.grant(0, stdinWindow-initWindow)
		}
		c.goSafe(func() {
			broken := false
			for {
				b, err := q.pop()
				if err != nil {
					if err == io.EOF && !broken {
						if tty {
							_, _ = stdinSink.Write([]byte{4}) // ^D: end of input on a terminal
						}
					}
					if !tty {
						stdinSink.Close()
					}
					return
				}
				if !broken {
					if _, werr := stdinSink.Write(b); werr != nil {
						broken = true // the process closed its stdin: discard the rest
					}
				}
				c.grant(0, len(b))
			}
		})
	}

	// Output readers; progress counts their reads (a reader still reading is not idle).
	var progress int64
	nstreams := 1
	if pr.out[1] != nil {
		nstreams = 2
	}
	done := make(chan int, 2)
	for i := 0; i < nstreams; i++ {
		stream, f := i, pr.out[i]
		c.goSafe(func() {
			defer func() { done <- stream }()
			buf := make([]byte, 32*1024)
			var sent int64
			discard := false
			for {
				n, err := f.Read(buf)
				atomic.AddInt64(&progress, 1)
				if n > 0 && !discard {
					data := buf[:n]
					if r.MaxOutput > 0 && sent+int64(n) > r.MaxOutput {
						data = data[:r.MaxOutput-sent]
						mu.Lock()
						truncated = true
						mu.Unlock()
					}
					sent += int64(len(data))
					if len(data) > 0 && !c.sendData(stream, data) {
						discard = true // gone or answered: drain into nothing
					}
				}
				if err != nil {
					break // EOF; EIO on a terminal's master once the terminal is closed
				}
				if pr.ptm == nil && n >= gatherAfter {
					if len(buf) < outReadBytes { // a bulk writer: large reads from now on
						buf = make([]byte, outReadBytes)
					}
					if n < len(buf) {
						time.Sleep(gatherDelay)
					}
				}
			}
			if pr.ptm == nil {
				f.Close()
			}
			c.sendEOF(stream)
		})
	}

	// Deadline: SIGTERM to the group, SIGKILL 2 s later.
	var timers []*time.Timer
	if r.TimeoutMS > 0 {
		t := time.AfterFunc(time.Duration(r.TimeoutMS)*time.Millisecond, func() {
			mu.Lock()
			if exited {
				mu.Unlock()
				return
			}
			timedOut = true
			mu.Unlock()
			killGroup(pgid, syscall.SIGTERM)
			t := time.AfterFunc(2*time.Second, func() {
				mu.Lock()
				ex := exited
				mu.Unlock()
				if !ex {
					killGroup(pgid, syscall.SIGKILL)
				}
			})
			mu.Lock()
			timers = append(timers, t)
			mu.Unlock()
		})
		mu.Lock()
		timers = append(timers, t)
		mu.Unlock()
	}

	_ = pr.cmd.Wait()
	mu.Lock()
	exited = true
	for _, t := range timers {
		t.Stop()
	}
	mu.Unlock()
	if pr.stdinW != nil {
		pr.stdinW.Close()
	}
	if c.in[0] != nil {
		c.in[0].close()
	}

	// The exec ends when its output is done too; a background child holding the pipes gets
	// 100 ms (not counting time spent waiting for the host's WINDOW), then is left to run with
	// its output drained into nothing.
	// When nothing is left in the process's group, only a process that left the group (a
	// daemon) can hold the pipes: the readers are just late (a busy machine), so wait longer.
	grace := 100 * time.Millisecond
	if err := syscall.Kill(-pgid, 0); err == syscall.ESRCH {
		grace = 5 * time.Second
	}
	finished := 0
	var idle time.Duration
	const tick = 10 * time.Millisecond
	ticker := time.NewTicker(tick)
	last := atomic.LoadInt64(&progress)
	for finished < nstreams {
		select {
		case <-done:
			finished++
			continue
		case <-ticker.C:
		}
		c.mu.Lock()
		waiting := c.waitingWin > 0
		c.mu.Unlock()
		now := atomic.LoadInt64(&progress)
		if waiting || now != last {
			idle = 0
		} else {
			idle += tick
		}
		last = now
		if idle >= grace {
			break
		}
	}
	ticker.Stop()
	if finished < nstreams {
		c.mu.Lock()
		for s := 0; s < nstreams; s++ {
			c.sendEOFLocked(s)
		}
		c.muted = true
		c.cond.Broadcast()
		c.mu.Unlock()
		go func() { // close the master once nobody holds the terminal any more
			for ; finished < nstreams; finished++ {
				<-done
			}
			if pr.ptm != nil {
				pr.ptm.Close()
			}
		}()
	} else if pr.ptm != nil {
		pr.ptm.Close()
	}

	code, sig := exitStatus(pr.cmd.ProcessState)
	mu.Lock()
	ex := map[string]any{"code": code, "signal": sig, "timed_out": timedOut, "truncated": truncated}
	mu.Unlock()
	c.msg(map[string]any{"exit": ex})
	return nil
}
