package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
)

// Frame types (docs/agent.md, "Frames").
const (
	tHello  = 1
	tOpen   = 2
	tMsg    = 3
	tData   = 4
	tEOF    = 5
	tWindow = 6
	tClose  = 7
)

const (
	magic0      = 0xD3
	magic1      = 0x4E
	headerLen   = 12
	maxPayload  = 262144
	maxHelloLen = 4096
	initWindow  = 262144
)

type frame struct {
	typ     uint8
	flags   uint8
	ch      uint32
	payload []byte
}

// encodeFrame returns the whole frame in one buffer, so that it can be written with one Write.
func encodeFrame(typ, flags uint8, ch uint32, payload []byte) []byte {
	b := make([]byte, headerLen+len(payload))
	b[0], b[1], b[2], b[3] = magic0, magic1, typ, flags
	binary.BigEndian.PutUint32(b[4:8], ch)
	binary.BigEndian.PutUint32(b[8:12], uint32(len(payload)))
	copy(b[headerLen:], payload)
	return b
}

// frameReader reads frames from the host. Until it has seen a HELLO, and whenever a frame is
// malformed (bad magic, a length over maxPayload, an unknown type, a HELLO that is not a valid
// HELLO), it discards input until it finds a whole HELLO frame.
type frameReader struct {
	r      *bufio.Reader
	synced bool
	// onResync is called (with a reason) each time the reader falls back to scanning.
	onResync func(reason string)
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 16384)}
}

func (fr *frameReader) resync(reason string) {
	fr.synced = false
	if fr.onResync != nil {
		fr.onResync(reason)
	}
}

// next returns the next well-formed frame; its error is the reader's (io.EOF at the end).
func (fr *frameReader) next() (frame, error) {
	for {
		if !fr.synced {
			f, err := fr.scanHello()
			if err != nil {
				return frame{}, err
			}
			fr.synced = true
			return f, nil
		}
		hdr, err := fr.r.Peek(headerLen)
		if err != nil {
			return frame{}, eofErr(err)
		}
		n := binary.BigEndian.Uint32(hdr[8:12])
		switch {
		case hdr[0] != magic0 || hdr[1] != magic1:
			fr.resync("bad magic")
			continue
		case n > maxPayload:
			fr.resync("frame too long")
			continue
		case hdr[2] < tHello || hdr[2] > tClose:
			fr.resync("unknown frame type")
			continue
		}
		f := frame{typ: hdr[2], flags: hdr[3], ch: binary.BigEndian.Uint32(hdr[4:8])}
		if _, err := fr.r.Discard(headerLen); err != nil {
			return frame{}, eofErr(err)
		}
		f.payload = make([]byte, n)
		if _, err := io.ReadFull(fr.r, f.payload); err != nil {
			return frame{}, eofErr(err)
		}
		if f.typ == tHello && (f.ch != 0 || n > maxHelloLen || !json.Valid(f.payload)) {
			fr.resync("malformed HELLO")
			continue
		}
		return f, nil
	}
}

func eofErr(err error) error {
	if err == io.ErrUnexpectedEOF {
		return io.EOF
	}
	return err
}

// scanHello discards input until a whole, valid HELLO frame is at the front, and returns it.
func (fr *frameReader) scanHello() (frame, error) {
	r := fr.r
	for {
		hdr, err := r.Peek(headerLen)
		if err != nil {
			return frame{}, eofErr(err)
		}
		if hdr[0] != magic0 || hdr[1] != magic1 {
			buf, _ := r.Peek(r.Buffered())
			i := bytes.IndexByte(buf[1:], magic0)
			if i < 0 {
				_, _ = r.Discard(len(buf))
			} else {
				_, _ = r.Discard(i + 1)
			}
			continue
		}
		n := binary.BigEndian.Uint32(hdr[8:12])
		if hdr[2] != tHello || binary.BigEndian.Uint32(hdr[4:8]) != 0 || n > maxHelloLen {
			_, _ = r.Discard(1)
			continue
		}
		whole, err := r.Peek(headerLen + int(n))
		if err != nil {
			return frame{}, eofErr(err)
		}
		if !json.Valid(whole[headerLen:]) {
			_, _ = r.Discard(1)
			continue
		}
		f := frame{typ: tHello, payload: append([]byte(nil), whole[headerLen:]...)}
		_, _ = r.Discard(headerLen + int(n))
		return f, nil
	}
}
