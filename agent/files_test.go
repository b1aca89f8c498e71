package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A directory whose listing would not fit one frame answers a truncated listing (an
// oversized frame would end the whole session).
func TestListFitsOneFrame(t *testing.T) {
	dir := t.TempDir()
	for i := 0; i < 2000; i++ {
		name := fmt.Sprintf("%04d-%s", i, strings.Repeat("x", 200))
		must(os.WriteFile(filepath.Join(dir, name), nil, 0o644))
	}
	c := newTestClient(t)
	r := c.call(map[string]any{"op": "list", "path": dir, "root": dir, "user": "root", "limit": 10000})
	ok := r.last("ok")
	if ok == nil || ok["truncated"] != true {
		t.Fatalf("list: %v", r.msgs)
	}
	entries, _ := ok["entries"].([]any)
	if len(entries) == 0 || len(entries) >= 2000 {
		t.Fatalf("list: %d entries", len(entries))
	}
	r = c.call(map[string]any{"op": "list", "path": dir, "root": dir, "user": "root", "limit": 10})
	if ok := r.last("ok"); ok == nil || ok["truncated"] != true || len(ok["entries"].([]any)) != 10 {
		t.Fatalf("list with a limit: %v", r.msgs)
	}
}
