package main

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// The account files; tests point these elsewhere with DEN_AGENT_PASSWD / DEN_AGENT_GROUP.
func passwdPath() string {
	if p := os.Getenv("DEN_AGENT_PASSWD"); p != "" {
		return p
	}
	return "/etc/passwd"
}

func groupPath() string {
	if p := os.Getenv("DEN_AGENT_GROUP"); p != "" {
		return p
	}
	return "/etc/group"
}

type userInfo struct {
	name   string
	uid    int
	gid    int
	groups []int // supplementary groups, the primary one included
	home   string
}

func readColonFile(path string, f func(fields []string) bool) {
	file, err := os.Open(path)
	if err != nil {
		return
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !f(strings.Split(line, ":")) {
			return
		}
	}
}

// lookupUser finds name (or a numeric uid) in the passwd file. An empty name is the agent's
// own user. nil when there is no such user.
func lookupUser(name string) *userInfo {
	if name == "" {
		u := &userInfo{uid: os.Getuid(), gid: os.Getgid(), home: "/"}
		u.groups = []int{u.gid}
		return u
	}
	var u *userInfo
	find := func(byUID bool) {
		readColonFile(passwdPath(), func(fl []string) bool {
			if len(fl) < 7 {
				return true
			}
			if (!byUID && fl[0] != name) || (byUID && fl[2] != name) {
				return true
			}
			uid, err1 := strconv.Atoi(fl[2])
			gid, err2 := strconv.Atoi(fl[3])
			if err1 != nil || err2 != nil {
				return true
			}
			u = &userInfo{name: fl[0], uid: uid, gid: gid, home: fl[5]}
			return false
		})
	}
	find(false)
	if u == nil {
		if _, err := strconv.Atoi(name); err == nil {
			find(true)
		}
	}
	if u == nil {
		return nil
	}
	u.groups = []int{u.gid}
	readColonFile(groupPath(), func(fl []string) bool {
		if len(fl) < 4 {
			return true
		}
		gid, err := strconv.Atoi(fl[2])
		if err != nil || gid == u.gid {
			return true
		}
		for _, m := range strings.Split(fl[3], ",") {
			if m == u.name {
				u.groups = append(u.groups, gid)
				break
			}
		}
		return true
	})
	return u
}

func (u *userInfo) credential() *syscall.SysProcAttr {
	attr := &syscall.SysProcAttr{}
	if os.Getuid() != 0 && u.uid == os.Getuid() {
		return attr // not root: run as ourselves
	}
	groups := make([]uint32, len(u.groups))
	for i, g := range u.groups {
		groups[i] = uint32(g)
	}
	attr.Credential = &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: groups}
	return attr
}

const (
	permR = 4
	permW = 2
	permX = 1
)

// can reports whether u may access a file with the given stat for want (permR|permW|permX
// bits). Root may do anything, except execute a file that has no x bit at all.
// opUser answers a user's ids as the workspace's account files give them: {"uid", "gid",
// "groups"} (the primary group among the groups). Den uses them to act for that user on the
// workspace's files from the host (docs/agent.md, "Files from the host").
func opUser(c *channel, r *request) error {
	u := lookupUser(r.User)
	if u == nil {
		return errf("no_user", "no user %q", r.User)
	}
	c.ok(map[string]any{"uid": u.uid, "gid": u.gid, "groups": u.groups})
	return nil
}

func (u *userInfo) can(st *syscall.Stat_t, want uint32) bool {
	mode := st.Mode & 0o777
	if u.uid == 0 {
		if want&permX != 0 && st.Mode&syscall.S_IFMT != syscall.S_IFDIR && mode&0o111 == 0 {
			return false
		}
		return true
	}
	var bits uint32
	switch {
	case int(st.Uid) == u.uid:
		bits = mode >> 6
	case u.inGroup(int(st.Gid)):
		bits = mode >> 3
	default:
		bits = mode
	}
	return bits&want == want
}

func (u *userInfo) inGroup(gid int) bool {
	for _, g := range u.groups {
		if g == gid {
			return true
		}
	}
	return false
}
