package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// directHost is the host's side of the handshake (server/agent/direct.py does the same).
// It returns the status byte, or an error when the agent's proof is wrong.
func directHost(t *testing.T, conn net.Conn, secret []byte, addr string, port int, hostProof func([]byte) []byte) (byte, error) {
	t.Helper()
	nonceH := make([]byte, 32)
	rand.Read(nonceH)
	if _, err := conn.Write(append([]byte(directMagic), nonceH...)); err != nil {
		return 0, err
	}
	var answer [64]byte
	if _, err := io.ReadFull(conn, answer[:]); err != nil {
		return 0, err
	}
	nonceA := answer[:32]
	if !hmac.Equal(directMAC(secret, "den-direct agent", nonceH, nonceA, []byte(addr)), answer[32:]) {
		return 0, errImpostor
	}
	target := []byte{4, 0, 0}
	binary.BigEndian.PutUint16(target[1:], uint16(port))
	proof := directMAC(secret, "den-direct host", nonceA, nonceH, target)
	if hostProof != nil {
		proof = hostProof(proof)
	}
	if _, err := conn.Write(append(target, proof...)); err != nil {
		return 0, err
	}
	var status [1]byte
	if _, err := io.ReadFull(conn, status[:]); err != nil {
		return 0, err
	}
	return status[0], nil
}

type impostorError struct{}

func (impostorError) Error() string { return "the agent's proof is wrong" }

var errImpostor = impostorError{}

// directAgent listens on loopback and serves each connection as the agent does, with secret.
func directAgent(t *testing.T, secret []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	d := &directListener{secret: secret}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go d.serve(c.(*net.TCPConn))
		}
	}()
	return ln.Addr().String()
}

// echo listens on loopback and echoes until the peer half-closes, then says "bye" and closes.
func echo(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.Write([]byte("bye"))
				c.Close()
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func secret32() []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

func TestDirectSplicesAfterBothProofs(t *testing.T) {
	secret := secret32()
	addr := directAgent(t, secret)
	port := echo(t)
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	status, err := directHost(t, conn, secret, addr, port, nil)
	if err != nil || status != 0 {
		t.Fatalf("status %d, err %v", status, err)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	go func() {
		conn.Write(big)
		conn.(*net.TCPConn).CloseWrite() // the half-close reaches the app
	}()
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(big, "bye"...)) {
		t.Fatalf("got %d bytes back, want %d", len(got), len(big)+3)
	}
}

func TestDirectNothingListening(t *testing.T) {
	secret := secret32()
	addr := directAgent(t, secret)
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if status, err := directHost(t, conn, secret, addr, port, nil); err != nil || status != 1 {
		t.Fatalf("status %d, err %v; want 1", status, err)
	}
}

func TestDirectHostWithoutTheSecretGetsNothing(t *testing.T) {
	secret := secret32()
	addr := directAgent(t, secret)
	port := echo(t)
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	// A proof made with another secret: the agent closes without a status byte.
	_, err = directHost(t, conn, secret, addr, port, func([]byte) []byte {
		return directMAC(secret32(), "den-direct host", []byte("x"))
	})
	if err == nil {
		t.Fatal("the agent answered a host with a wrong proof")
	}
}

func TestDirectAgentProofIsBoundToSecretAndAddress(t *testing.T) {
	secret := secret32()
	addr := directAgent(t, secret)
	port := echo(t)
	for _, c := range []struct {
		name, addr string
		secret     []byte
	}{
		{"another secret", addr, secret32()},
		{"another address", "127.0.0.1:" + strconv.Itoa(port), secret},
	} {
		conn, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := directHost(t, conn, c.secret, c.addr, port, nil); err != errImpostor {
			t.Fatalf("%s: err %v, want the agent's proof refused", c.name, err)
		}
		conn.Close()
	}
}

func TestDirectRejectsWhatIsNotAHandshake(t *testing.T) {
	addr := directAgent(t, secret32())
	conn, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789"))
	if n, err := conn.Read(make([]byte, 64)); err == nil {
		t.Fatalf("answered %d bytes to an HTTP request", n)
	}
}
