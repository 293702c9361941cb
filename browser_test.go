package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBrowser runs the JavaScript client and the WebSocket API in headless
// Chromium. The page (testdata/browser.html) comes from a second listener,
// another origin than the server, so CORS is exercised for real; it loads
// client.js with a script tag, runs each scenario and POSTs a report back.
// It also drives example.html, with its script pointed at the server.
func TestBrowser(t *testing.T) {
	chromium := needChromium(t)
	// A short heartbeat, so that the server notices a closed stream soon.
	// A short history, so that the page can be away long enough to need
	// a reset.
	srv, server := newTestServer(t, "-heartbeat", "100ms", "-history", "100")
	server = strings.Replace(server, "127.0.0.1", "localhost", 1) // another origin than the page's, by name too
	tokens := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(tokens, []byte("room-writer write /room/\n"), 0o600)
	_, guarded := newTestServer(t, "-tokens", tokens)
	guarded = strings.Replace(guarded, "127.0.0.1", "localhost", 1)

	page, err := os.ReadFile("testdata/browser.html")
	if err != nil {
		t.Fatal(err)
	}
	example, err := os.ReadFile("example.html")
	if err != nil {
		t.Fatal(err)
	}
	page = bytes.ReplaceAll(page, []byte("{{SERVER}}"), []byte(server))
	page = bytes.ReplaceAll(page, []byte("{{GUARDED}}"), []byte(guarded))
	example = bytes.ReplaceAll(example, []byte("http://localhost:8000"), []byte(server))

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { w.Write(page) })
	mux.HandleFunc("GET /example.html", func(w http.ResponseWriter, r *http.Request) { w.Write(example) })
	mux.HandleFunc("GET /subscribers", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strconv.Itoa(subscribersOf(srv.store, r.URL.Query().Get("path"))))
	})
	// drop closes the server's connections that watch a path, as a
	// network failure would; churn makes changes until the history
	// forgets.
	mux.HandleFunc("POST /drop", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, dropWatchers(srv, r.URL.Query().Get("path")))
	})
	mux.HandleFunc("POST /churn", func(w http.ResponseWriter, r *http.Request) {
		for i := range 1000 {
			srv.store.Set("/churn", strconv.Itoa(i), 0)
		}
	})
	results := browse(t, chromium, mux)
	checkResults(t, results, []string{
		"basic get/set/list", "fibonacci with update and retry", "subscribe to a prefix, delete, and break",
		"subscribe with initial", "TTL via the client", "raw WebSocket, KvServer style",
		"errors carry the server message", "any key through the client", "a dropped stream resumes, or resets",
		"a token through the client", "example page: shared counter",
	})
}

// needChromium returns the path of Chromium, or skips the test where it
// is missing (fails on CI, where .ci/run installs it).
func needChromium(t *testing.T) string {
	t.Helper()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("chromium is not installed, and on CI this test must run: .ci/run should have installed it")
		}
		t.Skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
	}
	return chromium
}

// pageResult is what a test page reports of one scenario.
type pageResult struct {
	Name   string
	OK     bool
	Detail string
}

// browse serves mux (its GET / is the page) and opens it in headless
// Chromium, and returns what the page POSTs to /report.
func browse(t *testing.T, chromium string, mux *http.ServeMux, flags ...string) []pageResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	return pageResults(t, ctx, openPage(t, ctx, chromium, mux, flags...))
}

// openPage serves mux (its GET / is the page) and opens it in headless
// Chromium until ctx is done or the test ends, and hands on what the page
// POSTs to /report: browse, for a test that does its part while the page
// runs.
func openPage(t *testing.T, ctx context.Context, chromium string, mux *http.ServeMux, flags ...string) <-chan []byte {
	t.Helper()
	report := reports(mux)
	mux.HandleFunc("GET /scenarios.js", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, "testdata/scenarios.js")
	})
	pages := httptest.NewServer(mux)
	t.Cleanup(pages.Close)
	log := startChromium(t, ctx, chromium, pages.URL+"/", flags...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("chromium console:\n%s", consoleLines(log.String()))
		}
	})
	return report
}

// reports serves POST /report on mux, where a test page posts its
// results, and hands the first report on.
func reports(mux *http.ServeMux) <-chan []byte {
	report := make(chan []byte, 1)
	mux.HandleFunc("POST /report", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		select {
		case report <- b:
		default:
		}
	})
	return report
}

// pageResults waits for a page's report, or fails the test once ctx is
// done, and reads its results.
func pageResults(t *testing.T, ctx context.Context, report <-chan []byte) []pageResult {
	t.Helper()
	var b []byte
	select {
	case b = <-report:
	case <-ctx.Done():
		t.Fatal("no report from the page")
	}
	var results []pageResult
	if err := json.Unmarshal(b, &results); err != nil {
		t.Fatalf("report %s: %v", b, err)
	}
	return results
}

// checkResults fails the test unless the page ran every scenario of want,
// in order, and each passed.
func checkResults(t *testing.T, results []pageResult, want []string) {
	t.Helper()
	if len(results) != len(want) {
		t.Errorf("got %d results; want %d", len(results), len(want))
	}
	for i, r := range results {
		if i < len(want) && r.Name != want[i] {
			t.Errorf("result %d is %q; want %q", i, r.Name, want[i])
		}
		switch {
		case r.OK && r.Detail != "":
			t.Logf("pass: %s (%s)", r.Name, r.Detail)
		case r.OK:
			t.Logf("pass: %s", r.Name)
		default:
			t.Errorf("fail: %s: %s", r.Name, r.Detail)
		}
	}
}

// dropWatchers closes every connection of srv (event stream or
// WebSocket) with a subscription on path, and returns how many.
func dropWatchers(srv *server, path string) int {
	queues := make(map[*coalescer]bool)
	srv.store.seqMu.Lock()
	for sub := range srv.store.subs.paths[path] {
		queues[sub.q] = true
	}
	srv.store.seqMu.Unlock()
	return srv.streams.closeIf(func(st *stream) bool { return queues[&st.q] })
}

// subscribersOf counts the subscriptions registered on path.
func subscribersOf(s *Store, path string) int {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	return len(s.subs.paths[path])
}

// consoleLines keeps what the page logged from Chromium's noisy stderr.
func consoleLines(log string) string {
	var b strings.Builder
	for line := range strings.SplitSeq(log, "\n") {
		if strings.Contains(line, "CONSOLE") || strings.Contains(line, "Uncaught") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}
