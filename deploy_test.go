package main

import (
	"bufio"
	"debug/elf"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// The deploy/ recipes, each tested as far as this machine allows: the
// container's build command makes the binary the other tests run, and
// the systemd unit is checked by systemd-analyze and its command line
// run. proxy_test.go puts that binary behind Caddy and nginx.

// needTool returns the path of a program a test needs. Without it the
// test skips with a message, except on CI, where .ci/run installs it.
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed, and on CI this test must run: .ci/run should have installed it", name)
		}
		t.Skipf("%s is not installed (apt-get install -y %s); .ci/run installs it", name, pkg)
	}
	return path
}

// buildStatic builds the server with the build command of
// deploy/Dockerfile, and checks that the binary is static: the container
// image has no C library for it to load.
func buildStatic(t *testing.T) string {
	t.Helper()
	recipe, err := os.ReadFile("deploy/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build .*) -o /atomkv \.$`).FindSubmatch(recipe)
	if m == nil {
		t.Fatal("deploy/Dockerfile has no line RUN CGO_ENABLED=0 go build … -o /atomkv .")
	}
	bin := filepath.Join(t.TempDir(), "atomkv")
	cmd := exec.Command("sh", "-c", string(m[1])+" -o "+bin+" .")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", m[1], err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Fatalf("%s: the binary is dynamically linked (%v); the scratch image cannot run it", m[1], p.Type)
		}
	}
	return bin
}

// TestDeployContainer checks deploy/Dockerfile: a static build (which
// buildStatic proves), an empty final image, -data on a volume owned by
// the user the server runs as, and its entry point's command line run:
// the data outlives a SIGTERM (docker stop), which exits 0. No container
// runtime is needed.
func TestDeployContainer(t *testing.T) {
	recipe, err := os.ReadFile("deploy/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	stages := regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllSubmatch(recipe, -1)
	if last := string(stages[len(stages)-1][1]); last != "scratch" && !strings.HasPrefix(last, "gcr.io/distroless/static") {
		t.Errorf("the final image is %s; want scratch or distroless/static", last)
	}
	for _, want := range []string{"VOLUME /data", "USER 65532:65532", "COPY --from=build --chown=65532:65532 /data /data"} {
		if !strings.Contains(string(recipe), "\n"+want+"\n") {
			t.Errorf("deploy/Dockerfile lacks %q", want)
		}
	}
	m := regexp.MustCompile(`(?m)^ENTRYPOINT (\[.*\])$`).FindSubmatch(recipe)
	var entry []string
	if m == nil || json.Unmarshal(m[1], &entry) != nil || len(entry) == 0 || entry[0] != "/atomkv" {
		t.Fatal(`deploy/Dockerfile has no ENTRYPOINT ["/atomkv", …]`)
	}
	if !slices.Contains(entry, "/data") {
		t.Errorf("ENTRYPOINT %s does not keep the data on the volume /data", m[1])
	}
	// The entry point's command line as the container would run it, the
	// volume a directory of the test's.
	args := slices.Clone(entry[1:])
	for i := range args {
		if args[i] == "/data" {
			args[i] = t.TempDir()
		}
	}
	keptAcrossRestart(t, buildStatic(t), args)
}

// TestDeploySystemd checks deploy/atomkv.service: the directives the
// issue asks for, systemd-analyze verify (where installed) without a
// warning, and its command line run as systemd would run it: the data
// outlives a SIGTERM, which exits 0.
func TestDeploySystemd(t *testing.T) {
	unit, err := os.ReadFile("deploy/atomkv.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"DynamicUser=yes", "StateDirectory=atomkv", "ProtectSystem=strict", "NoNewPrivileges=yes",
		"Restart=on-failure", "KillSignal=SIGTERM", "ExecReload=/bin/kill -HUP $MAINPID",
	} {
		if !strings.Contains(string(unit), "\n"+want+"\n") {
			t.Errorf("deploy/atomkv.service lacks %s", want)
		}
	}
	m := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/atomkv (.*)$`).FindSubmatch(unit)
	if m == nil {
		t.Fatal("deploy/atomkv.service has no ExecStart=/usr/local/bin/atomkv …")
	}
	bin := buildStatic(t)

	if analyze, err := exec.LookPath("systemd-analyze"); err == nil {
		dir := t.TempDir()
		path := filepath.Join(dir, "atomkv.service")
		os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/atomkv", bin)), 0o644)
		out, err := exec.Command(analyze, "verify", path).CombinedOutput()
		if err != nil || strings.Contains(string(out), "atomkv.service") {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	} else {
		t.Log("systemd-analyze is not installed: the unit is not verified by systemd")
	}

	// The command line, with what systemd would put for the state
	// directory.
	keptAcrossRestart(t, bin, strings.Fields(strings.ReplaceAll(string(m[1]), "${STATE_DIRECTORY}", t.TempDir())))
}

// keptAcrossRestart runs bin with a recipe's command line (its listen
// addresses made free ports of loopback): a key written, SIGTERM, exit 0,
// and the key is there when the same command line starts again.
func keptAcrossRestart(t *testing.T, bin string, args []string) {
	t.Helper()
	args = slices.Clone(args)
	for i := range args {
		if i > 0 && (args[i-1] == "-addr" || args[i-1] == "-admin-addr") {
			args[i] = "127.0.0.1:0"
		}
	}
	srv := startBinary(t, bin, args...)
	if r := do(t, "POST", srv.url+"/deploy/kept", `"on disk"`); r.code != 200 {
		t.Fatalf("POST: %d %s", r.code, r.body)
	}
	if err := srv.stop(); err != nil {
		t.Fatalf("%v after SIGTERM: %v; want exit status 0", args, err)
	}
	srv = startBinary(t, bin, args...)
	if r := do(t, "GET", srv.url+"/deploy/kept", ""); r.body != `"on disk"` {
		t.Errorf("%v after a restart: got %d %s; want \"on disk\"", args, r.code, r.body)
	}
}

// process is the server run as its own process.
type process struct {
	url, admin string // http://127.0.0.1:port of the main and admin listeners
	cmd        *exec.Cmd
}

// startBinary runs bin with args and waits until it listens. The test's
// end kills it if it still runs.
func startBinary(t *testing.T, bin string, args ...string) *process {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	b := &process{cmd: cmd}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		if _, a, ok := strings.Cut(line, `msg="admin listening" addr=`); ok {
			b.admin = "http://" + strings.Fields(a)[0]
		}
		if _, a, ok := strings.Cut(line, "msg=listening addr="); ok {
			b.url = "http://" + strings.Fields(a)[0]
			break
		}
	}
	go io.Copy(io.Discard, stdout)
	if b.url == "" {
		cmd.Wait()
		t.Fatalf("%s did not start: %s", bin, stderr.String())
	}
	return b
}

// stop sends SIGTERM and returns how the process ended.
func (b *process) stop() error {
	b.cmd.Process.Signal(syscall.SIGTERM)
	return b.cmd.Wait()
}

// freePort returns a port of 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
