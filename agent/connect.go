package main

import (
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

func opConnect(c *channel, r *request) error {
	switch r.Host {
	case "localhost", "127.0.0.1", "::1":
	default:
		return errf("invalid", "host must be localhost, 127.0.0.1 or ::1")
	}
	if r.Port < 1 || r.Port > 65535 {
		return errf("invalid", "bad port %d", r.Port)
	}
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(r.Host, strconv.Itoa(r.Port)), 10*time.Second)
	if err != nil {
		return errf("failed", "connect: %v", err)
	}
	tcp := conn.(*net.TCPConn)
	var closeOnce sync.Once
	closeConn := func() { closeOnce.Do(func() { conn.Close() }) }
	defer closeConn()
	c.setOnClose(func(bool) { closeConn() })
	c.ok(nil)

	var wg sync.WaitGroup
	wg.Add(2)
	c.goSafe(func() { // connection → host
		defer wg.Done()
		buf := make([]byte, 32*1024)
		for {
			n, err := tcp.Read(buf)
			if n > 0 && !c.sendData(0, buf[:n]) {
				return
			}
			if err != nil {
				c.sendEOF(0)
				return
			}
		}
	})
	c.goSafe(func() { // host → connection
		defer wg.Done()
		q := c.in[0]
		for {
			b, err := q.pop()
			if err == io.EOF {
				_ = tcp.CloseWrite()
				return
			}
			if err != nil {
				return
			}
			if _, err := tcp.Write(b); err != nil {
				closeConn()
				q.close()
				return
			}
			c.grant(0, len(b))
		}
	})
	wg.Wait()
	return nil
}
