package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// fsErr maps a file system error to an error answer.
func fsErr(err error, what string) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		code := map[syscall.Errno]string{
			syscall.ENOENT: "not_found", syscall.EEXIST: "exists", syscall.ENOTDIR: "not_dir",
			syscall.EISDIR: "is_dir", syscall.ENOTEMPTY: "not_empty", syscall.EACCES: "permission",
			syscall.EPERM: "permission", syscall.EINVAL: "invalid", syscall.EFBIG: "too_large",
		}[errno]
		if code != "" {
			return errf(code, "%s: %v", what, errno)
		}
	}
	return errf("failed", "%s: %v", what, err)
}

// resolvePath resolves every symlink of p: the longest existing prefix component by
// component, then the rest as written.
func resolvePath(p string) (string, error) {
	comps := strings.Split(filepath.Clean(p), "/")
	resolved := "/"
	links := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, c)
		fi, err := os.Lstat(next)
		if err != nil {
			if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ENOTDIR) {
				return filepath.Join(append([]string{next}, comps...)...), nil
			}
			return "", fsErr(err, p)
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			links++
			if links > 40 {
				return "", errf("failed", "%s: too many levels of symbolic links", p)
			}
			target, err := os.Readlink(next)
			if err != nil {
				return "", fsErr(err, p)
			}
			if filepath.IsAbs(target) {
				resolved = "/"
			}
			comps = append(strings.Split(target, "/"), comps...)
			continue
		}
		resolved = next
	}
	return resolved, nil
}

func within(root, p string) bool {
	return root == "/" || p == root || strings.HasPrefix(p, root+"/")
}

// fileReq is a checked file request: the user, the resolved root.
type fileReq struct {
	u    *userInfo
	root string
}

func newFileReq(r *request) (*fileReq, error) {
	if r.Root == "" || !filepath.IsAbs(r.Root) {
		return nil, errf("invalid", "root must be an absolute path")
	}
	if r.Path == "" || !filepath.IsAbs(r.Path) {
		return nil, errf("invalid", "path must be an absolute path")
	}
	u := lookupUser(r.User)
	if u == nil {
		return nil, errf("no_user", "no user %q", r.User)
	}
	root, err := filepath.EvalSymlinks(filepath.Clean(r.Root))
	if err != nil {
		return nil, fsErr(err, "root")
	}
	return &fileReq{u: u, root: root}, nil
}

// full resolves every symlink of p (the target itself included) and checks containment.
func (fq *fileReq) full(p string) (string, error) {
	rp, err := resolvePath(p)
	if err != nil {
		return "", err
	}
	if !within(fq.root, rp) {
		return "", errf("outside", "%s is outside %s", p, fq.root)
	}
	return rp, nil
}

// noFollow resolves p's directory, not its last component (stat, remove, rename act on a
// symlink itself), and checks containment.
func (fq *fileReq) noFollow(p, root string) (string, error) {
	cp := filepath.Clean(p)
	if cp == "/" || cp == filepath.Clean(root) {
		return fq.full(cp)
	}
	dir, err := resolvePath(filepath.Dir(cp))
	if err != nil {
		return "", err
	}
	rp := filepath.Join(dir, filepath.Base(cp))
	if !within(fq.root, rp) {
		return "", errf("outside", "%s is outside %s", p, fq.root)
	}
	return rp, nil
}

func lstat(p string) (*syscall.Stat_t, error) {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

func isDir(st *syscall.Stat_t) bool { return st.Mode&syscall.S_IFMT == syscall.S_IFDIR }

// traverse checks that the user may search every directory above p.
func (fq *fileReq) traverse(p string) error {
	if fq.u.uid == 0 {
		return nil
	}
	var dirs []string
	for d := filepath.Dir(p); ; d = filepath.Dir(d) {
		dirs = append(dirs, d)
		if d == "/" {
			break
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		st, err := lstat(dirs[i])
		if err != nil || !isDir(st) {
			return nil // the operation itself says not_found / not_dir
		}
		if !fq.u.can(st, permX) {
			return errf("permission", "%s: permission denied", dirs[i])
		}
	}
	return nil
}

// needDir checks that the user has want on the directory dir.
func (fq *fileReq) needDir(dir string, want uint32) error {
	st, err := lstat(dir)
	if err != nil {
		return fsErr(err, dir)
	}
	if !isDir(st) {
		return errf("not_dir", "%s is not a directory", dir)
	}
	if !fq.u.can(st, want) {
		return errf("permission", "%s: permission denied", dir)
	}
	return nil
}

func fileType(st *syscall.Stat_t) string {
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		return "file"
	case syscall.S_IFDIR:
		return "dir"
	case syscall.S_IFLNK:
		return "symlink"
	}
	return "other"
}

func statInfo(st *syscall.Stat_t) map[string]any {
	return map[string]any{
		"type":  fileType(st),
		"size":  st.Size,
		"mtime": float64(st.Mtim.Sec) + float64(st.Mtim.Nsec)/1e9,
		"mode":  fmt.Sprintf("%04o", st.Mode&0o7777),
	}
}

func opStat(c *channel, r *request) error {
	_, p, err := resolveReq(r, false)
	if err != nil {
		return err
	}
	st, err := lstat(p)
	if err != nil {
		return fsErr(err, r.Path)
	}
	c.ok(statInfo(st))
	return nil
}

// listBudget bounds a list answer's entries (encoded) so that the answer fits one frame.
const listBudget = maxPayload - 4096

func opList(c *channel, r *request) error {
	fq, p, err := resolveReq(r, true)
	if err != nil {
		return err
	}
	if err := fq.needDir(p, permR|permX); err != nil {
		return err
	}
	f, err := os.Open(p)
	if err != nil {
		return fsErr(err, r.Path)
	}
	defer f.Close()
	entries := []map[string]any{}
	truncated := false
	encoded := 0 // the answer is one MSG frame: its entries stay within listBudget bytes
	for {
		names, err := f.Readdirnames(256)
		for _, name := range names {
			if r.Limit > 0 && len(entries) >= r.Limit {
				truncated = true
				break
			}
			st, err := lstat(filepath.Join(p, name))
			if err != nil {
				continue // gone meanwhile
			}
			e := statInfo(st)
			e["name"] = name
			b, _ := json.Marshal(e)
			if encoded+len(b)+1 > listBudget {
				truncated = true
				break
			}
			encoded += len(b) + 1
			entries = append(entries, e)
		}
		if truncated || err != nil {
			if err != nil && err != io.EOF {
				return fsErr(err, r.Path)
			}
			break
		}
	}
	c.ok(map[string]any{"entries": entries, "truncated": truncated})
	return nil
}

// resolveReq is a file request's checked path: inside its root, and every directory on the
// way searchable by its user. With follow false the last component is not resolved (stat
// and remove act on a symlink itself).
func resolveReq(r *request, follow bool) (*fileReq, string, error) {
	fq, err := newFileReq(r)
	if err != nil {
		return nil, "", err
	}
	var p string
	if follow {
		p, err = fq.full(r.Path)
	} else {
		p, err = fq.noFollow(r.Path, r.Root)
	}
	if err != nil {
		return nil, "", err
	}
	if err := fq.traverse(p); err != nil {
		return nil, "", err
	}
	return fq, p, nil
}

func opRead(c *channel, r *request) error {
	fq, p, err := resolveReq(r, true)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return fsErr(err, r.Path)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return fsErr(err, r.Path)
	}
	if isDir(&st) {
		return errf("is_dir", "%s is a directory", r.Path)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return errf("invalid", "%s is not a regular file", r.Path)
	}
	if !fq.u.can(&st, permR) {
		return errf("permission", "%s: permission denied", r.Path)
	}
	if r.MaxBytes > 0 && st.Size > r.MaxBytes {
		return errf("too_large", "%s is %d bytes, more than %d", r.Path, st.Size, r.MaxBytes)
	}
	c.ok(map[string]any{"size": st.Size})
	buf := make([]byte, 64*1024)
	for {
		n, err := f.Read(buf)
		if n > 0 && !c.sendData(0, buf[:n]) {
			return nil
		}
		if err != nil {
			break
		}
	}
	c.sendEOF(0)
	return nil
}

// mkdirAll creates the missing directories of dir, owned by the user.
func (fq *fileReq) mkdirAll(dir string) error {
	var missing []string
	cur := dir
	for {
		st, err := lstat(cur)
		if err == nil {
			if !isDir(st) {
				return errf("not_dir", "%s is not a directory", cur)
			}
			break
		}
		if !errors.Is(err, syscall.ENOENT) {
			return fsErr(err, cur)
		}
		missing = append(missing, cur)
		cur = filepath.Dir(cur)
	}
	if len(missing) == 0 {
		return nil
	}
	if err := fq.traverse(missing[len(missing)-1]); err != nil {
		return err
	}
	if err := fq.needDir(cur, permW|permX); err != nil {
		return err
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := fq.mkdirOwned(missing[i]); err != nil {
			return err
		}
	}
	return nil
}

func (fq *fileReq) mkdirOwned(p string) error {
	if err := os.Mkdir(p, 0o755); err != nil {
		return fsErr(err, p)
	}
	if err := os.Lchown(p, fq.u.uid, fq.u.gid); err != nil {
		return fsErr(err, p)
	}
	return nil
}

func opMkdir(c *channel, r *request) error {
	fq, p, err := resolveReq(r, true)
	if err != nil {
		return err
	}
	if st, err := lstat(p); err == nil {
		if r.Parents && isDir(st) {
			c.ok(nil)
			return nil
		}
		return errf("exists", "%s exists", r.Path)
	}
	dir := filepath.Dir(p)
	if _, err := lstat(dir); err != nil && r.Parents {
		if err := fq.mkdirAll(dir); err != nil {
			return err
		}
	}
	if err := fq.needDir(dir, permW|permX); err != nil {
		return err
	}
	if err := fq.mkdirOwned(p); err != nil {
		return err
	}
	c.ok(nil)
	return nil
}

func (fq *fileReq) removeTree(p string) error {
	st, err := lstat(p)
	if err != nil {
		return fsErr(err, p)
	}
	if !isDir(st) {
		return fsErr(syscall.Unlink(p), p)
	}
	if !fq.u.can(st, permR|permW|permX) {
		return errf("permission", "%s: permission denied", p)
	}
	f, err := os.Open(p)
	if err != nil {
		return fsErr(err, p)
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fsErr(err, p)
	}
	for _, n := range names {
		if err := fq.removeTree(filepath.Join(p, n)); err != nil {
			return err
		}
	}
	return fsErrOrNil(syscall.Rmdir(p), p)
}

func fsErrOrNil(err error, what string) error {
	if err == nil {
		return nil
	}
	return fsErr(err, what)
}

func opRemove(c *channel, r *request) error {
	fq, p, err := resolveReq(r, false)
	if err != nil {
		return err
	}
	if p == fq.root {
		return errf("invalid", "cannot remove the root")
	}
	st, err := lstat(p)
	if err != nil {
		return fsErr(err, r.Path)
	}
	if err := fq.needDir(filepath.Dir(p), permW|permX); err != nil {
		return err
	}
	switch {
	case !isDir(st):
		err = fsErrOrNil(syscall.Unlink(p), r.Path)
	case r.Recursive:
		err = fq.removeTree(p)
	default:
		err = fsErrOrNil(syscall.Rmdir(p), r.Path)
	}
	if err != nil {
		return err
	}
	c.ok(nil)
	return nil
}

func opRename(c *channel, r *request) error {
	fq, err := newFileReq(r)
	if err != nil {
		return err
	}
	if r.To == "" || !filepath.IsAbs(r.To) {
		return errf("invalid", "to must be an absolute path")
	}
	src, err := fq.noFollow(r.Path, r.Root)
	if err != nil {
		return err
	}
	dst, err := fq.noFollow(r.To, r.Root)
	if err != nil {
		return err
	}
	if src == fq.root || dst == fq.root {
		return errf("invalid", "cannot rename the root")
	}
	for _, p := range []string{src, dst} {
		if err := fq.traverse(p); err != nil {
			return err
		}
	}
	sst, err := lstat(src)
	if err != nil {
		return fsErr(err, r.Path)
	}
	// rename(2)'s errno for a kind mismatch differs between kernels (gVisor answers
	// EEXIST for a file onto a directory), so the answer is decided here.
	if dst != src {
		if dstat, err := lstat(dst); err == nil && isDir(dstat) != isDir(sst) {
			if isDir(dstat) {
				return errf("is_dir", "%s is a directory", r.To)
			}
			return errf("not_dir", "%s is not a directory", r.To)
		}
	}
	for _, p := range []string{src, dst} {
		if err := fq.needDir(filepath.Dir(p), permW|permX); err != nil {
			return err
		}
	}
	if err := os.Rename(src, dst); err != nil {
		if errors.Is(err, syscall.EEXIST) {
			return errf("not_empty", "%s: directory not empty", r.To)
		}
		return fsErr(err, r.Path)
	}
	c.ok(nil)
	return nil
}

func opWrite(c *channel, r *request) error {
	fq, err := newFileReq(r)
	if err != nil {
		return err
	}
	p, err := fq.full(r.Path)
	if err != nil {
		return err
	}
	if p == fq.root {
		return errf("is_dir", "%s is a directory", r.Path)
	}
	dir := filepath.Dir(p)
	if _, err := lstat(dir); err != nil && r.Mkdirs && errors.Is(err, syscall.ENOENT) {
		if err := fq.mkdirAll(dir); err != nil {
			return err
		}
	}
	if err := fq.traverse(p); err != nil {
		return err
	}
	if err := fq.needDir(dir, permW|permX); err != nil {
		return err
	}
	mode := uint32(0o644)
	uid, gid := fq.u.uid, fq.u.gid
	if st, err := lstat(p); err == nil {
		if isDir(st) {
			return errf("is_dir", "%s is a directory", r.Path)
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
			return errf("invalid", "%s is not a regular file", r.Path)
		}
		if !fq.u.can(st, permW) {
			return errf("permission", "%s: permission denied", r.Path)
		}
		mode, uid, gid = st.Mode&0o7777, int(st.Uid), int(st.Gid)
	} else if !errors.Is(err, syscall.ENOENT) {
		return fsErr(err, r.Path)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, ".den-write-"+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fsErr(err, r.Path)
	}
	removeTmp := func() {
		f.Close()
		os.Remove(tmp)
	}
	if err := f.Chown(uid, gid); err != nil {
		removeTmp()
		return fsErr(err, r.Path)
	}
	if err := f.Chmod(os.FileMode(mode & 0o777)); err != nil {
		removeTmp()
		return fsErr(err, r.Path)
	}
	if mode&0o7000 != 0 { // setuid/setgid/sticky: chmod(2) with the raw bits
		_ = syscall.Fchmod(int(f.Fd()), mode)
	}
	c.ok(nil) // ready: the host sends DATA, then EOF
	q := c.in[0]
	var size int64
	for {
		b, err := q.pop()
		if err == errClosed {
			removeTmp() // the host closed the channel before EOF
			return nil
		}
		if err == io.EOF {
			break
		}
		size += int64(len(b))
		if r.MaxBytes > 0 && size > r.MaxBytes {
			removeTmp()
			return errf("too_large", "more than %d bytes", r.MaxBytes)
		}
		if _, err := f.Write(b); err != nil {
			removeTmp()
			return fsErr(err, r.Path)
		}
		c.grant(0, len(b))
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fsErr(err, r.Path)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fsErr(err, r.Path)
	}
	c.ok(map[string]any{"size": size})
	return nil
}
