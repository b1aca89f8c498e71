// den-agent: the program that runs inside every Den workspace (docs/agent.md).
//
//	den-agent init [--] [command args...]   PID 1: reaps, runs `serve` and the image's init
//	den-agent serve                         the protocol, for relays on /run/den-agent/agent.sock
//	den-agent relay                         one session: stdin/stdout <-> serve's socket
//	den-agent version                       prints the version
package main

import (
	"fmt"
	"io"
	"log"
	"os"
	"syscall"
	"time"
)

// version is set at build time (-X main.version=...).
var version = "dev"

func usage() {
	fmt.Fprintln(os.Stderr, "usage: den-agent init [--] [command args...] | den-agent serve | den-agent relay | den-agent version")
	os.Exit(2)
}

func realMain(args []string) int {
	if len(args) < 1 {
		usage()
	}
	switch args[0] {
	case "version", "--version":
		fmt.Println(version)
		return 0
	case "serve":
		if os.Getenv("DEN_AGENT_STDIO") == "1" { // tests: the protocol on stdin/stdout
			return serveMain(persistentReader{blockingFile(0, "stdin")}, blockingFile(1, "stdout"))
		}
		c := newConns()
		logger := log.New(os.Stderr, fmt.Sprintf("den-agent serve[%d]: ", os.Getpid()), 0)
		if err := c.listen(logger.Printf); err != nil {
			logger.Printf("listen on %s: %v", socketPath, err)
			return 1
		}
		return serveMain(c, c)
	case "relay":
		return relayMain()
	case "init":
		return initMain(args[1:])
	}
	usage()
	return 2
}

func serveMain(in io.Reader, out io.Writer) int {
	logger := log.New(os.Stderr, fmt.Sprintf("den-agent serve[%d]: ", os.Getpid()), 0)
	s := newServer(in, out, logger)
	logger.Printf("started, version %s", version)
	if err := s.run(); err != nil {
		logger.Printf("reading from host: %v", err)
		return 1
	}
	logger.Printf("input closed: exiting")
	return 0
}

func main() {
	os.Exit(realMain(os.Args[1:]))
}

// persistentReader keeps reading the channel after an end or an error: the host's attach
// comes and goes (a checkpoint ends it, a restore brings it back, Den restarts), and the
// agent must outlive all of them with its process table. It waits 50 ms between tries.
type persistentReader struct{ r io.Reader }

func (p persistentReader) Read(b []byte) (int, error) {
	for {
		n, err := p.r.Read(b)
		if n > 0 {
			return n, nil
		}
		if err != nil {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// blockingFile opens one of the channel's descriptors for plain blocking I/O, outside Go's
// poller. Under gVisor the channel is a host descriptor; a serve restarted after the previous
// one was killed never saw it become ready through the poller (measured: the restarted agent
// read nothing), while blocking reads and writes work in every case.
func blockingFile(fd int, name string) *os.File {
	if err := syscall.SetNonblock(fd, false); err != nil {
		return os.NewFile(uintptr(fd), name)
	}
	return os.NewFile(uintptr(fd), name)
}
