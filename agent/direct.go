package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// The direct path (docs/agent.md "Direct connections"): a TCP listener on the workspace's
// own address that Den, on the host, connects to for `connect`-like connections without the
// engine's exec stream and without framing. Den hands the agent a secret over the relay (the
// `direct` op); every connection then starts with a handshake in which each side proves it
// knows the secret over a fresh challenge of the other, and only then names the port:
//
//	host  → agent  "DND1" nonceH[32]
//	agent → host   nonceA[32] HMAC(secret, "den-direct agent" nonceH nonceA addr)
//	host  → agent  family[1] port[2] HMAC(secret, "den-direct host" nonceA nonceH family port)
//	agent → host   status[1]   0: connected, then raw bytes both ways; 1: nothing listens
//
// addr is the listener's address as the agent sees it ("ip:port"): a proof made for one
// address is worth nothing at another. A wrong proof ends the connection without an answer.
const directPort = 7386
const directMagic = "DND1"
const directHandshakeTimeout = 5 * time.Second

type directListener struct {
	mu     sync.Mutex
	secret []byte
	ln     net.Listener
}

var direct = &directListener{}

// opDirect sets the secret (the newest session's) and starts the listener once.
func opDirect(c *channel, r *request) error {
	secret, err := hex.DecodeString(r.Secret)
	if err != nil || len(secret) < 32 || len(secret) > 64 {
		return errf("invalid", "secret must be 32 to 64 bytes in hex")
	}
	if err := direct.enable(secret, c.s.log.Printf); err != nil {
		return errf("failed", "listen on port %d: %v", directPort, err)
	}
	c.ok(map[string]any{"port": directPort})
	return nil
}

func (d *directListener) enable(secret []byte, logf func(string, ...any)) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.secret = secret
	if d.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp4", ":"+strconv.Itoa(directPort))
	if err != nil {
		return err
	}
	d.ln = ln
	go d.accept(ln, logf)
	return nil
}

func (d *directListener) key() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.secret
}

func (d *directListener) accept(ln net.Listener, logf func(string, ...any)) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			logf("direct: accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go func() {
			if err := d.serve(conn.(*net.TCPConn)); err != nil {
				logf("direct: %s: %v", conn.RemoteAddr(), err)
			}
		}()
	}
}

func directMAC(secret []byte, label string, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(label))
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// handshake is the agent's side; it returns the target ("127.0.0.1:port") once the host
// proved itself.
func directHandshake(rw io.ReadWriter, secret []byte, addr string) (string, error) {
	var hello [4 + 32]byte
	if _, err := io.ReadFull(rw, hello[:]); err != nil {
		return "", err
	}
	if string(hello[:4]) != directMagic {
		return "", errors.New("not a direct connection")
	}
	nonceH := hello[4:]
	nonceA := make([]byte, 32)
	if _, err := rand.Read(nonceA); err != nil {
		return "", err
	}
	proof := directMAC(secret, "den-direct agent", nonceH, nonceA, []byte(addr))
	if _, err := rw.Write(append(nonceA, proof...)); err != nil {
		return "", err
	}
	var reply [3 + 32]byte
	if _, err := io.ReadFull(rw, reply[:]); err != nil {
		return "", err
	}
	want := directMAC(secret, "den-direct host", nonceA, nonceH, reply[:3])
	if !hmac.Equal(want, reply[3:]) {
		return "", errors.New("the host's proof is wrong")
	}
	port := int(binary.BigEndian.Uint16(reply[1:3]))
	if port < 1 {
		return "", errors.New("port 0")
	}
	switch reply[0] {
	case 4:
		return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), nil
	case 6:
		return net.JoinHostPort("::1", strconv.Itoa(port)), nil
	}
	return "", errors.New("bad address family")
}

func (d *directListener) serve(conn *net.TCPConn) error {
	defer conn.Close()
	secret := d.key()
	conn.SetDeadline(time.Now().Add(directHandshakeTimeout))
	target, err := directHandshake(conn, secret, conn.LocalAddr().String())
	if err != nil {
		return err
	}
	app, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		conn.Write([]byte{1})
		return nil // nothing listens: the host says so
	}
	defer app.Close()
	if _, err := conn.Write([]byte{0}); err != nil {
		return err
	}
	conn.SetDeadline(time.Time{})
	splice(conn, app.(*net.TCPConn))
	return nil
}

// splice copies both ways until both ends are done, passing on each half-close.
func splice(a, b *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	one := func(dst, src *net.TCPConn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			// a reset or a write that failed: end both, the other copy returns too
			a.Close()
			b.Close()
			return
		}
		dst.CloseWrite()
	}
	go one(a, b)
	go one(b, a)
	wg.Wait()
}
