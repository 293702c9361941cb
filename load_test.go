package main

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The load tests measure; they assert nothing about speed. They run only
// with ATOMKV_LOAD=1 (see README.md) and only against 127.0.0.1.

func needLoad(t *testing.T) {
	t.Helper()
	if os.Getenv("ATOMKV_LOAD") == "" {
		t.Skip("load test: set ATOMKV_LOAD=1 to run it")
	}
}

// TestLoadHTTP compares GET and POST throughput of the real server with a
// bare net/http handler answering the same small JSON body, using wrk
// over loopback. Rounds alternate between the two so that noise on this
// shared machine hits both alike; the figure is the median ratio.
func TestLoadHTTP(t *testing.T) {
	needLoad(t)
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (apt-get install -y wrk)")
	}
	url := startServer(t)
	do(t, "POST", url+"/k/1", `{"v":1}`)
	// The same server with -tokens: 100 tokens, the requests sending the
	// 51st, which may write /k/.
	var lines []string
	for i := range 100 {
		lines = append(lines, fmt.Sprintf("token-%03d-%s write /t%d/ /k/", i, strings.Repeat("x", 24), i))
	}
	bearer := "Authorization: Bearer token-050-" + strings.Repeat("x", 24)
	guarded := startServer(t, "-tokens", writeTokens(t, lines...))
	do(t, "POST", guarded+"/k/1", `{"v":1}`, "Authorization", strings.TrimPrefix(bearer, "Authorization: "))
	// The yardstick answers the same bytes, headers included (SPEC
	// requires the CORS ones on every answer), so the ratio measures what
	// this server adds: routing, validation and the store.
	bare := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Expose-Headers", "X-Revision, X-TTL, X-Seq, Link")
		h.Set("Content-Type", "application/json")
		h.Set("X-Revision", "1")
		io.WriteString(w, `{"v":1}`)
	}))
	defer bare.Close()

	post := filepath.Join(t.TempDir(), "post.lua")
	os.WriteFile(post, []byte(`wrk.method = "POST"; wrk.body = '{"v":1}'; wrk.headers["Content-Type"] = "application/json"`), 0o644)
	rps := regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	// measure returns requests per second, and CPU time this process (the
	// server under load; wrk is another process) spent per request.
	measure := func(target string, script ...string) (float64, time.Duration) {
		args := append([]string{"-t1", "-c64", "-d2s"}, script...)
		before := cpuTime()
		out, err := exec.Command(wrk, append(args, target)...).CombinedOutput()
		cpu := cpuTime() - before
		m := rps.FindSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("wrk: %v\n%s", err, out)
		}
		f, _ := strconv.ParseFloat(string(m[1]), 64)
		return f, cpu / time.Duration(f*2)
	}
	for _, method := range []string{"GET", "POST"} {
		var script []string
		if method == "POST" {
			script = []string{"-s", post}
		}
		var speed, cpu, gspeed, gcpu []float64
		for round := range 7 {
			b, bcpu := measure(bare.URL+"/k/1", script...)
			a, acpu := measure(url+"/k/1", script...)
			g, gcpuReq := measure(guarded+"/k/1", append([]string{"-H", bearer}, script...)...)
			speed = append(speed, a/b)
			cpu = append(cpu, float64(bcpu)/float64(acpu))
			gspeed = append(gspeed, g/b)
			gcpu = append(gcpu, float64(bcpu)/float64(gcpuReq))
			t.Logf("%s round %d: atomkv %.0f req/s %v CPU/req, with -tokens %.0f req/s %v CPU/req, bare %.0f req/s %v CPU/req",
				method, round, a, acpu, g, gcpuReq, b, bcpu)
		}
		fmt.Printf("%s: atomkv / bare net/http: throughput %.3f, CPU efficiency %.3f (medians of %d rounds)\n",
			method, median(speed), median(cpu), len(speed))
		fmt.Printf("%s: atomkv -tokens (100) / bare net/http: throughput %.3f, CPU efficiency %.3f\n",
			method, median(gspeed), median(gcpu))
	}
}

func median(xs []float64) float64 {
	xs = slices.Clone(xs)
	slices.Sort(xs)
	return xs[len(xs)/2]
}

// cpuTime is the user and system CPU time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
