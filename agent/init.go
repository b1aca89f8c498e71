package main

import (
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

const (
	restartFirst        = 200 * time.Millisecond
	restartMax          = 5 * time.Second
	restartReset        = 10 * time.Second // a child that ran this long restarts after restartFirst again
	termGrace           = 2 * time.Second
	prSetChildSubreaper = 36
)

// initChild is a child init keeps running: serve, and the image's init when it has one.
type initChild struct {
	name      string
	argv      []string
	files     []*os.File
	pid       int // 0 when not running
	startedAt time.Time
	backoff   time.Duration
	restartAt time.Time
}

// initMain is PID 1: it reaps every orphan, runs `serve` (with init's own stdin, stdout and
// stderr: the channel) and the image's init, restarting them when they exit.
func initMain(args []string) int {
	logger := log.New(os.Stderr, fmt.Sprintf("den-agent init[%d]: ", os.Getpid()), 0)
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		args = []string{"/usr/local/bin/den-init"}
	}
	if os.Getpid() != 1 {
		// Not PID 1 (a test, or an engine's own init in front): become the subreaper, so
		// that orphans still come to us.
		if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
			logger.Printf("PR_SET_CHILD_SUBREAPER: %v", errno)
		}
	}
	// serve is started by the path init was started with when it is absolute
	// (/.den/current/den-agent), so that a restarted serve is the agent now installed there.
	self := os.Args[0]
	if !filepath.IsAbs(self) {
		var err error
		if self, err = os.Executable(); err != nil {
			self = "/proc/self/exe"
		}
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		logger.Printf("open %s: %v", os.DevNull, err)
		devnull = os.Stdin
	}
	children := []*initChild{{
		name: "serve", argv: []string{self, "serve"},
		files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
	}}
	if _, err := os.Stat(args[0]); err == nil {
		// The image's init must not touch the channel: no stdin, its stdout goes to stderr.
		children = append(children, &initChild{
			name: args[0], argv: args, files: []*os.File{devnull, os.Stderr, os.Stderr},
		})
	}

	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, syscall.SIGCHLD, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	defaultSignalsForChildren()
	startChild := func(c *initChild) {
		p, err := os.StartProcess(c.argv[0], c.argv, &os.ProcAttr{Files: c.files, Env: os.Environ()})
		now := time.Now()
		if err != nil {
			logger.Printf("start %s: %v", c.name, err)
			c.pid = 0
			c.scheduleRestart(now, 0)
			return
		}
		c.pid, c.startedAt = p.Pid, now
		_ = p.Release() // reaped by the wait4(-1) loop below
		logger.Printf("started %s (pid %d)", c.name, c.pid)
	}
	for _, c := range children {
		startChild(c)
	}

	terminating := false
	var deadline time.Time
	for {
		// Reap everything that has exited: our children and adopted orphans.
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
			for _, c := range children {
				if c.pid == pid {
					c.pid = 0
					logger.Printf("%s (pid %d) exited: %s", c.name, pid, describeWait(ws))
					if !terminating {
						c.scheduleRestart(time.Now(), time.Since(c.startedAt))
					}
				}
			}
		}
		now := time.Now()
		if terminating {
			alive := false
			for _, c := range children {
				alive = alive || c.pid != 0
			}
			if !alive || now.After(deadline) {
				logger.Printf("exiting")
				return 0
			}
		} else {
			for _, c := range children {
				if c.pid == 0 && !c.restartAt.IsZero() && !now.Before(c.restartAt) {
					c.restartAt = time.Time{}
					startChild(c)
				}
			}
		}
		// Sleep until a signal (SIGCHLD included), or the next restart or deadline when one
		// is due. Nothing else wakes an idle init: no tick (an idle sandbox must cost the
		// host no CPU; a wakeup a second measured ~0.5% of a CPU under gVisor's systrap).
		var due <-chan time.Time
		wait, pending := time.Duration(0), false
		for _, c := range children {
			if c.pid == 0 && !c.restartAt.IsZero() {
				if d := time.Until(c.restartAt); !pending || d < wait {
					wait, pending = d, true
				}
			}
		}
		if terminating {
			if d := time.Until(deadline); !pending || d < wait {
				wait, pending = d, true
			}
		}
		var timer *time.Timer
		if pending {
			if wait < 0 {
				wait = 0
			}
			timer = time.NewTimer(wait)
			due = timer.C
		}
		select {
		case sig := <-sigs:
			s := sig.(syscall.Signal)
			if s != syscall.SIGCHLD {
				for _, c := range children {
					if c.pid != 0 {
						_ = syscall.Kill(c.pid, s)
					}
				}
				if s == syscall.SIGTERM && !terminating {
					logger.Printf("SIGTERM: stopping")
					terminating = true
					deadline = time.Now().Add(termGrace)
				}
			}
		case <-due:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// scheduleRestart: after restartFirst, doubling up to restartMax while the child keeps
// exiting soon after its start.
func (c *initChild) scheduleRestart(now time.Time, ran time.Duration) {
	if c.backoff == 0 || ran >= restartReset {
		c.backoff = restartFirst
	} else {
		c.backoff *= 2
		if c.backoff > restartMax {
			c.backoff = restartMax
		}
	}
	c.restartAt = now.Add(c.backoff)
}

func describeWait(ws syscall.WaitStatus) string {
	if ws.Signaled() {
		return "signal " + signalName(ws.Signal())
	}
	return fmt.Sprintf("code %d", ws.ExitStatus())
}
