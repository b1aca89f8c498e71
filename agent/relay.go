package main

import (
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// The host reaches `serve` through `den-agent relay`, a short-lived process the engine runs
// (docker exec) for each session: its stdin and stdout are the engine's stream, and it
// copies them to and from serve's Unix socket inside the sandbox. A new session is a new
// relay, with pipes of its own. (The container's own stdin through an attach cannot be used
// for this: the engine closes it after a second attach has ended.)
const socketDir = "/run/den-agent"
const socketPath = socketDir + "/agent.sock"
const relayBufBytes = 256 * 1024

// relayMain copies stdin to the socket and the socket to stdout until either side ends.
func relayMain() int {
	conn, err := net.Dial("unix", socketPath)
	if err != nil {
		os.Stderr.WriteString("den-agent relay: " + err.Error() + "\n")
		return 1
	}
	done := make(chan struct{}, 2)
	// Large buffers: under gVisor each read and write costs far more than the bytes it moves
	// (the agent writes up to 256 KiB of frames at once).
	copyBig := func(dst io.Writer, src io.Reader) {
		// (wrapped: an *os.File's ReadFrom would otherwise copy with its own 32 KiB buffer)
		io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src},
			make([]byte, relayBufBytes))
		done <- struct{}{}
	}
	go copyBig(conn, blockingFile(0, "stdin"))
	go copyBig(blockingFile(1, "stdout"), conn)
	<-done
	conn.Close()
	return 0
}

// conns is the host's channel as one byte stream over successive relay connections: Read
// reads the newest connection and, when it ends, waits for the next one; Write writes to the
// newest (and drops what it cannot write: the next session starts with a HELLO anyway).
type conns struct {
	mu   sync.Mutex
	cond *sync.Cond
	cur  net.Conn
}

func newConns() *conns {
	c := &conns{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *conns) set(conn net.Conn) {
	c.mu.Lock()
	old := c.cur
	c.cur = conn
	c.cond.Broadcast()
	c.mu.Unlock()
	if old != nil {
		old.Close() // a newer session replaces it; its relay exits
	}
}

func (c *conns) drop(conn net.Conn) {
	c.mu.Lock()
	if c.cur == conn {
		c.cur = nil
	}
	c.mu.Unlock()
	conn.Close()
}

func (c *conns) Read(b []byte) (int, error) {
	for {
		c.mu.Lock()
		for c.cur == nil {
			c.cond.Wait()
		}
		conn := c.cur
		c.mu.Unlock()
		n, err := conn.Read(b)
		if n > 0 {
			return n, nil
		}
		if err != nil {
			c.drop(conn)
		}
	}
}

func (c *conns) Write(b []byte) (int, error) {
	c.mu.Lock()
	conn := c.cur
	c.mu.Unlock()
	if conn == nil {
		return len(b), nil
	}
	conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	n, err := conn.Write(b)
	if err != nil {
		c.drop(conn)
		return len(b), nil
	}
	return n, nil
}

// listen accepts relay connections on the socket (only root may connect) forever.
func (c *conns) listen(logf func(string, ...any)) error {
	if err := os.MkdirAll(socketDir, 0o700); err != nil {
		return err
	}
	os.Chmod(socketDir, 0o700)
	os.Remove(socketPath)
	l, err := net.Listen("unix", socketPath)
	if err != nil {
		return err
	}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				logf("accept: %v", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			c.set(conn)
		}
	}()
	return nil
}
