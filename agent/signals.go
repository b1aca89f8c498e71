package main

import (
	"os"
	"os/signal"
	"sync"
	"syscall"
)

var childSignalsOnce sync.Once

// defaultSignalsForChildren makes the processes the agent starts begin with every signal at
// its default action. An ignored signal stays ignored across execve, so an agent started by a
// shell that ignores SIGINT or SIGQUIT (nohup, a background job, a trap with an empty action)
// would pass that on and an exec's `signal INT` would do nothing. A caught signal is reset by
// execve: catch each inherited-ignored one and drop it, so the agent itself still ignores it.
// Called before the first child is started; idempotent.
func defaultSignalsForChildren() {
	childSignalsOnce.Do(func() {
		var ignored []os.Signal
		for sig := syscall.Signal(1); sig < 32; sig++ {
			if sig == syscall.SIGKILL || sig == syscall.SIGSTOP {
				continue
			}
			if signal.Ignored(sig) {
				ignored = append(ignored, sig)
			}
		}
		if len(ignored) == 0 {
			return
		}
		drop := make(chan os.Signal, 1) // never read: deliveries to a full channel are dropped
		signal.Notify(drop, ignored...)
	})
}
