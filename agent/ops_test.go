package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSpawnPsLogsSignal(t *testing.T) {
	c := newTestClient(t)
	req := execReq("sh", "-c", "echo out; echo err >&2; exec sleep 30")
	req["op"] = "spawn"
	r := c.call(req)
	ok := r.last("ok")
	if ok == nil {
		t.Fatalf("spawn: %v", r.msgs)
	}
	pid := int(ok["pid"].(float64))
	defer syscall.Kill(-pid, syscall.SIGKILL)
	time.Sleep(200 * time.Millisecond)

	r = c.call(map[string]any{"op": "logs", "pid": pid})
	if string(r.data[0]) != "out\n" || string(r.data[1]) != "err\n" || r.last("ok")["running"] != true || !r.eof[0] || !r.eof[1] {
		t.Fatalf("logs: %q %q %v", r.data[0], r.data[1], r.msgs)
	}
	if st := c.call(map[string]any{"op": "status"}).last("ok"); st["processes"].(float64) < 1 || st["version"] != version || st["cpu_ns"].(float64) <= 0 || st["memory_bytes"].(float64) <= 0 {
		t.Fatalf("status: %v", st)
	}
	follow := c.open(map[string]any{"op": "logs", "pid": pid, "follow": true})
	time.Sleep(100 * time.Millisecond)
	if r := c.call(map[string]any{"op": "signal", "pid": pid, "signal": "TERM"}); r.last("ok") == nil {
		t.Fatalf("signal: %v", r.msgs)
	}
	r = follow.collect(5 * time.Second)
	if e := exitOf(t, r); e["signal"] != "TERM" || e["code"] != float64(143) || string(r.data[0]) != "out\n" {
		t.Fatalf("follow: %v %q", r.msgs, r.data[0])
	}
	r = c.call(map[string]any{"op": "ps"})
	var found map[string]any
	for _, p := range r.last("ok")["processes"].([]any) {
		if m := p.(map[string]any); m["pid"] == float64(pid) {
			found = m
		}
	}
	if found == nil || found["running"] != false || found["exit_code"] != float64(143) || found["signal"] != "TERM" ||
		found["user"] != "root" || found["cwd"] != "/tmp" || found["started_at"].(float64) < 1e9 {
		t.Fatalf("ps: %v", found)
	}
	if r := c.call(map[string]any{"op": "signal", "pid": pid, "signal": "TERM"}); r.errCode() != "not_found" {
		t.Fatalf("signal exited: %v", r.msgs)
	}
	if r := c.call(map[string]any{"op": "signal", "pid": 999999, "signal": "TERM"}); r.errCode() != "not_found" {
		t.Fatalf("signal unknown: %v", r.msgs)
	}
	if r := c.call(map[string]any{"op": "logs", "pid": 999999}); r.errCode() != "not_found" {
		t.Fatalf("logs unknown: %v", r.msgs)
	}
}

func TestSpawnRing(t *testing.T) {
	c := newTestClient(t)
	req := execReq("sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done")
	req["op"], req["log_bytes"] = "spawn", 100
	pid := int(c.call(req).last("ok")["pid"].(float64))
	r := c.open(map[string]any{"op": "logs", "pid": pid, "follow": true}).collect(5 * time.Second)
	if !strings.HasSuffix(string(r.data[0]), "line499\n") {
		t.Fatalf("ring: %q", r.data[0])
	}
	if e := exitOf(t, r); e["code"] != float64(0) {
		t.Fatalf("ring exit: %v", e)
	}
	r = c.call(map[string]any{"op": "logs", "pid": pid})
	if len(r.data[0]) != 100 || !strings.HasSuffix(string(r.data[0]), "line499\n") || r.last("ok")["running"] != false {
		t.Fatalf("ring after exit: %q %v", r.data[0], r.msgs)
	}
}

func TestRingSkipAhead(t *testing.T) {
	rg := ring{cap: 10}
	rg.add(0, []byte("0123456"))
	rg.add(1, []byte("789ab"))
	if rg.start() != 2 || rg.end != 12 {
		t.Fatalf("start %d end %d", rg.start(), rg.end)
	}
	s, d, next, skipped := rg.read(0, 100)
	if s != 0 || string(d) != "23456" || next != 7 || !skipped {
		t.Fatalf("read: %d %q %d %v", s, d, next, skipped)
	}
	s, d, _, _ = rg.read(next, 100)
	if s != 1 || string(d) != "789ab" {
		t.Fatalf("read 2: %d %q", s, d)
	}
	rg.add(0, bytes.Repeat([]byte("x"), 50))
	if rg.size != 10 || rg.start() != 52 {
		t.Fatalf("big add: size %d start %d", rg.size, rg.start())
	}
	rg.add(0, []byte("yz"))
	if _, d, _, _ := rg.read(0, 100); string(d) != "xxxxxxxxyz" {
		t.Fatalf("after big add: %q", d)
	}
}

// fileEnv: root is a workspace dir owned by tuser inside a temp dir everyone can search.
func fileEnv(t *testing.T) (string, string) {
	base := t.TempDir()
	os.Chmod(base, 0o755)
	os.Chmod(filepath.Dir(base), 0o755) // t.TempDir's parent
	root := filepath.Join(base, "ws")
	must(os.Mkdir(root, 0o755))
	must(os.Chown(root, 4242, 4242))
	return base, root
}

func TestFiles(t *testing.T) {
	c := newTestClient(t)
	base, root := fileEnv(t)
	fr := func(op, path string, extra map[string]any) *result {
		req := map[string]any{"op": op, "path": path, "root": root, "user": "tuser"}
		for k, v := range extra {
			req[k] = v
		}
		return c.call(req)
	}
	write := func(path string, content []byte, extra map[string]any) *result {
		req := map[string]any{"op": "write", "path": path, "root": root, "user": "tuser"}
		for k, v := range extra {
			req[k] = v
		}
		ch := c.open(req)
		m := ch.nextMsg(5 * time.Second)
		if m["ok"] == nil {
			r := ch.collect(5 * time.Second)
			r.msgs = append([]map[string]any{m}, r.msgs...)
			return r
		}
		ch.dataFlow(content)
		ch.eof()
		return ch.collect(10 * time.Second)
	}

	// write (with mkdirs), read back, owned by the user.
	big := bytes.Repeat([]byte("abcdefgh"), 100000) // 800 KB: through the window
	r := write(root+"/a/b/f.txt", big, map[string]any{"mkdirs": true})
	if r.last("ok")["size"] != float64(len(big)) {
		t.Fatalf("write: %v", r.msgs)
	}
	var st syscall.Stat_t
	syscall.Stat(root+"/a/b/f.txt", &st)
	if st.Uid != 4242 || st.Gid != 4242 || st.Mode&0o777 != 0o644 {
		t.Fatalf("owner %d:%d mode %o", st.Uid, st.Gid, st.Mode&0o777)
	}
	syscall.Stat(root+"/a", &st)
	if st.Uid != 4242 || !isDir(&st) {
		t.Fatalf("mkdirs owner %d", st.Uid)
	}
	r = fr("read", root+"/a/b/f.txt", nil)
	if !bytes.Equal(r.data[0], big) || r.last("ok")["size"] != float64(len(big)) || !r.eof[0] {
		t.Fatalf("read: %d bytes %v", len(r.data[0]), r.msgs)
	}
	if r := fr("read", root+"/a/b/f.txt", map[string]any{"max_bytes": 10}); r.errCode() != "too_large" {
		t.Fatalf("read too_large: %v", r.msgs)
	}
	if r := fr("read", root+"/a", nil); r.errCode() != "is_dir" {
		t.Fatalf("read dir: %v", r.msgs)
	}
	if r := fr("read", root+"/nope", nil); r.errCode() != "not_found" {
		t.Fatalf("read missing: %v", r.msgs)
	}
	// Overwrite keeps the mode; too_large removes the temporary file.
	os.Chmod(root+"/a/b/f.txt", 0o640)
	if r := write(root+"/a/b/f.txt", []byte("new"), nil); r.last("ok") == nil {
		t.Fatalf("overwrite: %v", r.msgs)
	}
	syscall.Stat(root+"/a/b/f.txt", &st)
	if b, _ := os.ReadFile(root + "/a/b/f.txt"); string(b) != "new" || st.Mode&0o777 != 0o640 {
		t.Fatalf("overwrite: %q %o", b, st.Mode&0o777)
	}
	if r := write(root+"/a/b/f.txt", []byte("0123456789"), map[string]any{"max_bytes": 5}); r.errCode() != "too_large" {
		t.Fatalf("write too_large: %v", r.msgs)
	}
	if ents, _ := os.ReadDir(root + "/a/b"); len(ents) != 1 {
		t.Fatalf("temp file left: %v", ents)
	}
	if r := write(root+"/x/y", []byte("z"), nil); r.errCode() != "not_found" {
		t.Fatalf("write without mkdirs: %v", r.msgs)
	}
	// A host CLOSE before EOF removes the temporary file.
	ch := c.open(map[string]any{"op": "write", "path": root + "/a/b/g", "root": root, "user": "tuser"})
	ch.nextMsg(5 * time.Second)
	ch.data([]byte("partial"))
	ch.closeChan()
	time.Sleep(100 * time.Millisecond)
	if ents, _ := os.ReadDir(root + "/a/b"); len(ents) != 1 {
		t.Fatalf("temp file left after CLOSE: %v", ents)
	}

	// stat, list
	st2 := fr("stat", root+"/a/b/f.txt", nil).last("ok")
	if st2["type"] != "file" || st2["size"] != float64(3) || st2["mode"] != "0640" || st2["mtime"].(float64) < 1e9 {
		t.Fatalf("stat: %v", st2)
	}
	os.Symlink("b", root+"/a/lnk")
	if fr("stat", root+"/a/lnk", nil).last("ok")["type"] != "symlink" {
		t.Fatalf("stat symlink")
	}
	r = fr("list", root+"/a", nil)
	if ents := r.last("ok")["entries"].([]any); len(ents) != 2 || r.last("ok")["truncated"] != false {
		t.Fatalf("list: %v", r.msgs)
	}
	if r := fr("list", root+"/a", map[string]any{"limit": 1}); len(r.last("ok")["entries"].([]any)) != 1 || r.last("ok")["truncated"] != true {
		t.Fatalf("list limit: %v", r.msgs)
	}
	if r := fr("list", root+"/a/b/f.txt", nil); r.errCode() != "not_dir" {
		t.Fatalf("list file: %v", r.msgs)
	}

	// mkdir, rename, remove
	if r := fr("mkdir", root+"/m/n", nil); r.errCode() != "not_found" {
		t.Fatalf("mkdir no parents: %v", r.msgs)
	}
	if r := fr("mkdir", root+"/m/n", map[string]any{"parents": true}); r.last("ok") == nil {
		t.Fatalf("mkdir parents: %v", r.msgs)
	}
	if r := fr("mkdir", root+"/m", nil); r.errCode() != "exists" {
		t.Fatalf("mkdir exists: %v", r.msgs)
	}
	if r := fr("rename", root+"/m", map[string]any{"to": root + "/m2"}); r.last("ok") == nil {
		t.Fatalf("rename: %v", r.msgs)
	}
	must(os.WriteFile(root+"/plain", []byte("x"), 0o644))
	if r := fr("rename", root+"/plain", map[string]any{"to": root + "/m2/n"}); r.errCode() != "is_dir" {
		t.Fatalf("rename a file onto a directory: %v", r.msgs)
	}
	if r := fr("rename", root+"/m2/n", map[string]any{"to": root + "/plain"}); r.errCode() != "not_dir" {
		t.Fatalf("rename a directory onto a file: %v", r.msgs)
	}
	must(os.Remove(root + "/plain"))
	if r := fr("remove", root+"/m2", nil); r.errCode() != "not_empty" {
		t.Fatalf("remove not_empty: %v", r.msgs)
	}
	if r := fr("remove", root+"/m2", map[string]any{"recursive": true}); r.last("ok") == nil {
		t.Fatalf("remove recursive: %v", r.msgs)
	}
	if _, err := os.Stat(root + "/m2"); err == nil {
		t.Fatalf("m2 still there")
	}
	if r := fr("remove", root, map[string]any{"recursive": true}); r.errCode() != "invalid" {
		t.Fatalf("remove root: %v", r.msgs)
	}
	if r := fr("remove", root+"/a/lnk", nil); r.last("ok") == nil {
		t.Fatalf("remove symlink: %v", r.msgs)
	}
	if _, err := os.Stat(root + "/a/b/f.txt"); err != nil {
		t.Fatalf("removing the symlink removed its target")
	}

	// outside: through a symlink, "..", a dangling link, rename out
	os.WriteFile(base+"/secret", []byte("s"), 0o644)
	os.Symlink(base, root+"/out")
	os.Symlink(base+"/newfile", root+"/dangling")
	for _, p := range []string{root + "/out/secret", root + "/../secret", root + "/out"} {
		if r := fr("read", p, nil); r.errCode() != "outside" {
			t.Errorf("read %s: %v", p, r.msgs)
		}
	}
	if r := fr("list", root+"/out", nil); r.errCode() != "outside" {
		t.Errorf("list outside: %v", r.msgs)
	}
	if r := write(root+"/dangling", []byte("x"), nil); r.errCode() != "outside" {
		t.Errorf("write through a dangling link: %v", r.msgs)
	}
	if r := write(root+"/out/new", []byte("x"), nil); r.errCode() != "outside" {
		t.Errorf("write outside: %v", r.msgs)
	}
	if r := fr("mkdir", root+"/out/d", nil); r.errCode() != "outside" {
		t.Errorf("mkdir outside: %v", r.msgs)
	}
	if r := fr("rename", root+"/a/b/f.txt", map[string]any{"to": root + "/out/f"}); r.errCode() != "outside" {
		t.Errorf("rename outside: %v", r.msgs)
	}
	if r := fr("remove", root+"/out/secret", nil); r.errCode() != "outside" {
		t.Errorf("remove outside: %v", r.msgs)
	}
	if _, err := os.Stat(base + "/newfile"); err == nil {
		t.Errorf("wrote outside")
	}
	if r := fr("stat", "relative", nil); r.errCode() != "invalid" {
		t.Errorf("relative path: %v", r.msgs)
	}
	if r := c.call(map[string]any{"op": "stat", "path": root, "root": root, "user": "ghost"}); r.errCode() != "no_user" {
		t.Errorf("no_user: %v", r.msgs)
	}
}

func TestFilePermissions(t *testing.T) {
	c := newTestClient(t)
	_, root := fileEnv(t)
	fr := func(user, op, path string, extra map[string]any) *result {
		req := map[string]any{"op": op, "path": path, "root": root, "user": user}
		for k, v := range extra {
			req[k] = v
		}
		return c.call(req)
	}
	// root-owned files and dirs inside the workspace.
	must(os.WriteFile(root+"/private", []byte("p"), 0o600))
	must(os.WriteFile(root+"/readonly", []byte("r"), 0o644))
	must(os.Mkdir(root+"/rootdir", 0o755))
	must(os.WriteFile(root+"/rootdir/f", []byte("f"), 0o666))
	must(os.Mkdir(root+"/closed", 0o700))
	must(os.WriteFile(root+"/closed/f", []byte("f"), 0o644))
	must(os.Mkdir(root+"/groupdir", 0o770))
	must(os.Chown(root+"/groupdir", 0, 4444))
	must(os.Chmod(root+"/groupdir", 0o770)) // past the umask
	must(os.Chmod(root+"/rootdir/f", 0o666))

	expect := func(r *result, code string) {
		t.Helper()
		if code == "" && r.last("ok") == nil || code != "" && r.errCode() != code {
			t.Errorf("want %q, got %v", code, r.msgs)
		}
	}
	expect(fr("tuser", "read", root+"/private", nil), "permission")
	expect(fr("root", "read", root+"/private", nil), "")
	expect(fr("tuser", "read", root+"/readonly", nil), "")
	expect(fr("tuser", "stat", root+"/closed/f", nil), "permission")   // no x on closed
	expect(fr("tuser", "list", root+"/closed", nil), "permission")     // no r+x
	expect(fr("tuser", "mkdir", root+"/rootdir/d", nil), "permission") // no w on the parent
	expect(fr("tuser", "remove", root+"/rootdir/f", nil), "permission")
	expect(fr("tuser", "remove", root+"/readonly", nil), "") // w+x on the workspace: fine
	expect(fr("tuser", "rename", root+"/rootdir/f", map[string]any{"to": root + "/g"}), "permission")
	expect(fr("tuser", "mkdir", root+"/groupdir/d", nil), "") // through group tgroup
	expect(fr("other", "mkdir", root+"/groupdir/e", nil), "permission")
	expect(fr("other", "mkdir", root+"/x", nil), "permission") // workspace is tuser's 0755

	// write over a file without w on it; a new file in a dir without w.
	ch := c.open(map[string]any{"op": "write", "path": root + "/rootdir/f2", "root": root, "user": "tuser"})
	expect(ch.collect(5*time.Second), "permission")
	os.Chmod(root+"/rootdir", 0o777)
	must(os.WriteFile(root+"/rootdir/ro", []byte("f"), 0o644))
	ch = c.open(map[string]any{"op": "write", "path": root + "/rootdir/ro", "root": root, "user": "tuser"})
	expect(ch.collect(5*time.Second), "permission")
	// rootdir/f is 0666: writable by tuser; the file keeps its owner and mode.
	ch = c.open(map[string]any{"op": "write", "path": root + "/rootdir/f", "root": root, "user": "tuser"})
	if m := ch.nextMsg(5 * time.Second); m["ok"] == nil {
		t.Fatalf("write 0666: %v", m)
	}
	ch.data([]byte("changed"))
	ch.eof()
	expect(ch.collect(5*time.Second), "")
	var st syscall.Stat_t
	syscall.Stat(root+"/rootdir/f", &st)
	if st.Uid != 0 || st.Mode&0o777 != 0o666 {
		t.Errorf("overwritten file: uid %d mode %o", st.Uid, st.Mode&0o777)
	}
}

func TestConnect(t *testing.T) {
	c := newTestClient(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				b, _ := io.ReadAll(conn) // until the agent's half-close
				conn.Write(append([]byte("echo:"), b...))
				conn.Close()
			}()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	ch := c.open(map[string]any{"op": "connect", "host": "127.0.0.1", "port": port})
	if m := ch.nextMsg(5 * time.Second); m["ok"] == nil {
		t.Fatalf("connect: %v", m)
	}
	payload := bytes.Repeat([]byte("z"), 600000)
	ch.dataFlow(payload)
	ch.eof()
	r := ch.collect(10 * time.Second)
	if !bytes.Equal(r.data[0], append([]byte("echo:"), payload...)) || !r.eof[0] {
		t.Fatalf("connect relay: %d bytes", len(r.data[0]))
	}
	ln.Close()
	if r := c.call(map[string]any{"op": "connect", "host": "127.0.0.1", "port": port}); r.errCode() != "failed" {
		t.Fatalf("connect refused: %v", r.msgs)
	}
	if r := c.call(map[string]any{"op": "connect", "host": "10.0.0.1", "port": 80}); r.errCode() != "invalid" {
		t.Fatalf("connect elsewhere: %v", r.msgs)
	}
}

func TestUser(t *testing.T) {
	c := newTestClient(t)
	ok := c.call(map[string]any{"op": "user", "user": "tuser"}).last("ok")
	if ok == nil || ok["uid"] != float64(4242) || ok["gid"] != float64(4242) {
		t.Fatalf("user tuser: %v", ok)
	}
	groups, _ := ok["groups"].([]any)
	want := map[float64]bool{4242: true, 4444: true}
	if len(groups) != len(want) {
		t.Fatalf("groups of tuser: %v", groups)
	}
	for _, g := range groups {
		if f, _ := g.(float64); !want[f] {
			t.Errorf("groups of tuser: %v", groups)
		}
	}
	if r := c.call(map[string]any{"op": "user", "user": "ghost"}); r.errCode() != "no_user" {
		t.Errorf("no_user: %v", r.msgs)
	}
}
