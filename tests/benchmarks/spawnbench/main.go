// spawnbench: how long starting `true` and waiting for it takes inside a sandbox, several
// ways (os/exec as den-agent does, syscall.ForkExec, with and without pipes, process groups,
// sessions, a smaller environment, a pre-forked helper that only execs). docs/benchmarks.md,
// "Exec latency". Build it static and run it in a raw runsc container:
//
//	cd tests/benchmarks/spawnbench && CGO_ENABLED=0 go build -o /tmp/sb/spawnbench .
//	docker run -d --name dentest-spawn --runtime=runsc -v /tmp/sb:/opt/sb:ro \
//	    den/workspace:latest sleep infinity   # plus bench_workspaces.Raw's limits
//	docker exec dentest-spawn /opt/sb/spawnbench 40          # two rounds, variant by variant
//	docker exec dentest-spawn /opt/sb/spawnbench 40 inter    # four variants interleaved, and Start() alone
//	docker rm -f dentest-spawn
package main

import (
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"syscall"
	"time"
)

func pct(d []time.Duration) string {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return fmt.Sprintf("p50 %6.2f ms  p90 %6.2f ms", ms(d[len(d)/2]), ms(d[len(d)*9/10]))
}
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

var smallEnv = []string{"PATH=/bin:/usr/bin"}
var bigEnv []string

func init() {
	bigEnv = append(bigEnv, smallEnv...)
	for i := 0; i < 40; i++ {
		bigEnv = append(bigEnv, "VAR"+strconv.Itoa(i)+"=some value of moderate length for the environment")
	}
}

func osexec(pipes, pgid bool, env []string) func() {
	return func() {
		cmd := &exec.Cmd{Path: "/bin/true", Args: []string{"true"}, Env: env, Dir: "/tmp",
			SysProcAttr: &syscall.SysProcAttr{Setpgid: pgid}}
		var rs []*os.File
		if pipes {
			for i := 0; i < 2; i++ {
				r, w, _ := os.Pipe()
				rs = append(rs, r)
				if i == 0 {
					cmd.Stdout = w
				} else {
					cmd.Stderr = w
				}
				defer w.Close()
			}
		}
		if err := cmd.Start(); err != nil {
			panic(err)
		}
		if pipes {
			cmd.Stdout.(*os.File).Close()
			cmd.Stderr.(*os.File).Close()
			done := make(chan bool, 2)
			for _, r := range rs {
				r := r
				go func() {
					b := make([]byte, 1024)
					for {
						if _, err := r.Read(b); err != nil {
							break
						}
					}
					r.Close()
					done <- true
				}()
			}
			<-done
			<-done
		}
		cmd.Wait()
	}
}

func forkexec(pipes, pgid, setsid bool, env []string) func() {
	return func() {
		devnull, _ := os.OpenFile("/dev/null", os.O_RDWR, 0)
		defer devnull.Close()
		files := []uintptr{devnull.Fd(), devnull.Fd(), devnull.Fd()}
		var rs, ws []*os.File
		if pipes {
			for i := 0; i < 2; i++ {
				r, w, _ := os.Pipe()
				rs = append(rs, r)
				ws = append(ws, w)
				files[1+i] = w.Fd()
			}
		}
		attr := &syscall.ProcAttr{Dir: "/tmp", Env: env, Files: files,
			Sys: &syscall.SysProcAttr{Setpgid: pgid, Setsid: setsid}}
		pid, err := syscall.ForkExec("/bin/true", []string{"true"}, attr)
		if err != nil {
			panic(err)
		}
		for _, w := range ws {
			w.Close()
		}
		for _, r := range rs {
			b := make([]byte, 1024)
			for {
				if _, err := r.Read(b); err != nil {
					break
				}
			}
			r.Close()
		}
		var st syscall.WaitStatus
		syscall.Wait4(pid, &st, 0, nil)
	}
}

// prefork: a helper already forked waits on a pipe, then execs true; timed from the write.
func prefork(n int) []time.Duration {
	self, _ := os.Executable()
	var out []time.Duration
	for i := 0; i < n; i++ {
		r, w, _ := os.Pipe()
		cmd := exec.Command(self, "helper")
		cmd.Stdin = r
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Start()
		r.Close()
		time.Sleep(30 * time.Millisecond) // let it get to its read (not timed)
		t := time.Now()
		w.Write([]byte{1})
		cmd.Wait()
		out = append(out, time.Since(t))
		w.Close()
	}
	return out
}

func helper() {
	b := make([]byte, 1)
	syscall.Read(0, b)
	syscall.Exec("/bin/true", []string{"true"}, smallEnv)
}

func bench(name string, n int, fn func()) {
	fn()
	var d []time.Duration
	for i := 0; i < n; i++ {
		t := time.Now()
		fn()
		d = append(d, time.Since(t))
	}
	fmt.Printf("%-44s %s\n", name, pct(d))
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "exit" {
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "helper" {
		helper()
		return
	}
	n := 40
	if len(os.Args) > 1 {
		n, _ = strconv.Atoi(os.Args[1])
	}
	if len(os.Args) > 2 && os.Args[2] == "inter" {
		self, _ := os.Executable()
		variants := []struct {
			name string
			fn   func()
		}{
			{"os/exec pipes setpgid bigenv (agent today)", osexec(true, true, bigEnv)},
			{"ForkExec pipes setpgid smallenv", forkexec(true, true, false, smallEnv)},
			{"ForkExec /dev/null setpgid", forkexec(false, true, false, smallEnv)},
			{"os/exec static binary, pipes", func() { c := exec.Command(self, "exit"); c.Run() }},
		}
		res := make([][]time.Duration, len(variants))
		for i := 0; i < n; i++ {
			for j, v := range variants {
				t := time.Now()
				v.fn()
				res[j] = append(res[j], time.Since(t))
			}
		}
		for j, v := range variants {
			fmt.Printf("%-44s %s\n", v.name, pct(res[j]))
		}
		var st []time.Duration
		for i := 0; i < n; i++ {
			c := exec.Command("/bin/true")
			t := time.Now()
			c.Start()
			st = append(st, time.Since(t))
			c.Wait()
		}
		fmt.Printf("%-44s %s\n", "os/exec /bin/true: Start() alone", pct(st))
		return
	}
	for round := 0; round < 2; round++ {
		fmt.Printf("round %d\n", round)
		bench("os/exec pipes setpgid bigenv (agent today)", n, osexec(true, true, bigEnv))
		bench("os/exec pipes setpgid smallenv", n, osexec(true, true, smallEnv))
		bench("os/exec pipes no-setpgid", n, osexec(true, false, smallEnv))
		bench("os/exec /dev/null setpgid", n, osexec(false, true, smallEnv))
		bench("ForkExec pipes setpgid", n, forkexec(true, true, false, smallEnv))
		bench("ForkExec /dev/null setpgid", n, forkexec(false, true, false, smallEnv))
		bench("ForkExec /dev/null none", n, forkexec(false, false, false, smallEnv))
		bench("ForkExec /dev/null setsid", n, forkexec(false, false, true, smallEnv))
		fmt.Printf("%-44s %s\n", "pre-forked helper: write -> exec -> wait", pct(prefork(n)))
	}
}
