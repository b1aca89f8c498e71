// den-agent: the program that runs inside every Den workspace (docs/agent.md).
//
//	den-agent init [--] [command args...]   PID 1: reaps, runs `serve` and the image's init
//	den-agent serve                         the protocol on stdin/stdout
//	den-agent version                       prints the version
package main

import (
	"fmt"
	"io"
	"log"
	"os"
	"time"
)

// version is set at build time (-X main.version=...).
var version = "dev"

func usage() {
	fmt.Fprintln(os.Stderr, "usage: den-agent init [--] [command args...] | den-agent serve | den-agent version")
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
		return serveMain(persistentReader{os.Stdin}, os.Stdout)
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
