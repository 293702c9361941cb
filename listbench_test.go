package main

// The fuzzing of the listing's query parser, and benchmarks of SPEC 3a's
// cost targets.

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

// FuzzParseListQuery: whatever parseListQuery accepts is a listing it
// can run (a limit from 1 to 10,000, or none; an after that is a key, or
// with shallow also a prefix), and whatever it refuses it refuses with a
// message that names the bad parameter.
func FuzzParseListQuery(f *testing.F) {
	for _, s := range []string{"", "1", "10000", "0", "10001", "-1", "007", " 5", "+5", "1e3", "0x10"} {
		f.Add(s, true, "/a", false)
		f.Add(s, false, "", true)
	}
	for _, a := range []string{"/a/b/", "/", "a", "/a//b", "/a/..", "/\xff", "/a\x01", "/ключ", "/a b:c%d"} {
		f.Add("5", true, a, true)
		f.Add("", false, a, false)
	}
	f.Fuzz(func(t *testing.T, limit string, hasLimit bool, after string, shallow bool) {
		var lp *string
		if hasLimit {
			lp = &limit
		}
		q, err := parseListQuery(lp, after, shallow, 4096)
		if err != nil {
			msg := err.Error()
			if !strings.HasPrefix(msg, "invalid limit") && !strings.HasPrefix(msg, "invalid after") {
				t.Errorf("limit %q, after %q: error %q names neither", limit, after, msg)
			}
			if !utf8.ValidString(msg) && utf8.ValidString(after) {
				t.Errorf("error %q is not UTF-8", msg)
			}
			return
		}
		switch {
		case hasLimit && (q.limit < 1 || q.limit > maxPage):
			t.Errorf("limit %q accepted as %d", limit, q.limit)
		case !hasLimit && q.limit != 0:
			t.Errorf("no limit read as %d", q.limit)
		case q.after != after || q.shallow != shallow:
			t.Errorf("after %q shallow %v read as %q %v", after, shallow, q.after, q.shallow)
		case after == "":
		case strings.HasSuffix(after, "/") && (!shallow || checkPath(after, 4096) != nil):
			t.Errorf("after %q (shallow %v) accepted: a prefix is an after only with shallow", after, shallow)
		case !strings.HasSuffix(after, "/") && checkKey(after, 4096) != nil:
			t.Errorf("after %q accepted, which is no key", after)
		}
	})
}

// Benchmarks of SPEC 3a's cost targets: a listing or a state reads the
// ordered index (index.go) in O(log n + k).

// benchStore returns a server whose store holds a prefix of n keys,
// /k/0000000 …, and a prefix of 10 keys, /m/0 … /m/9. Stores are built
// once per size, in key order, and kept for the other benchmarks (b.Run
// calls a benchmark again for each b.N).
func benchStore(b *testing.B, n int) *server {
	b.Helper()
	benchStores.Lock()
	defer benchStores.Unlock()
	if srv := benchStores.m[n]; srv != nil {
		return srv
	}
	srv := newBenchServer(b, n)
	if benchStores.m == nil {
		benchStores.m = map[int]*server{}
	}
	benchStores.m[n] = srv
	return srv
}

// newBenchServer returns a new server whose store holds what benchStore
// says.
func newBenchServer(b *testing.B, n int) *server {
	b.Helper()
	cfg, err := parseConfig(nil, func(string) string { return "" }, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := newServer(cfg, discardLogger())
	if err != nil {
		b.Fatal(err)
	}
	for i := range n {
		srv.store.Set(fmt.Sprintf("/k/%07d", i), `{"v":1}`, 0)
	}
	for i := range 10 {
		srv.store.Set(fmt.Sprintf("/m/%d", i), `{"v":1}`, 0)
	}
	return srv
}

var benchStores struct {
	sync.Mutex
	m map[int]*server
}

// BenchmarkListSmallPrefix lists a prefix of 10 keys through the HTTP
// handler (read, encode, write to a discarding writer) in a store of 10
// keys and of 1,000,000 more: SPEC 3a wants the same cost. The ratio of
// the two is the figure (docs/performance.md).
func BenchmarkListSmallPrefix(b *testing.B) {
	for _, n := range []int{0, 1_000_000} {
		b.Run(fmt.Sprintf("store=%d", n+10), func(b *testing.B) {
			srv := benchStore(b, n)
			serveBench(b, srv.routes(), "/m/")
		})
	}
}

// serveBench GETs target from h, b.N times, and returns the writer of
// the last answer.
func serveBench(b *testing.B, h http.Handler, target string) *nullWriter {
	req := httptest.NewRequest("GET", target, nil)
	w := &nullWriter{}
	b.ReportAllocs()
	runtime.GC() // each run starts with the collector's work done
	defer reportCPU(b)()
	for range b.N {
		r := *req
		r.URL = new(*req.URL) // cors may clear RawPath
		*r.URL = *req.URL
		w.h = http.Header{}
		h.ServeHTTP(w, &r)
	}
	return w
}

// reportCPU resets b's timer and returns a function that reports the
// process's CPU time per op (the collector's included), a steadier
// figure than ns/op on a shared machine, where waiting for a CPU counts
// in the wall time.
func reportCPU(b *testing.B) func() {
	b.ResetTimer()
	start := cpuTime()
	return func() {
		b.StopTimer()
		b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
	}
}

// BenchmarkStateSmallPrefix sends the state of a prefix of 10 keys, up to
// its synced, in a store of 10 keys and of 1,000,000 more: the
// subscription with initial, its cursor read to the end, as a writer
// reads it, and the subscription ended.
func BenchmarkStateSmallPrefix(b *testing.B) {
	for _, n := range []int{0, 1_000_000} {
		b.Run(fmt.Sprintf("store=%d", n+10), func(b *testing.B) {
			srv := benchStore(b, n)
			s := srv.store
			var out []event
			b.ReportAllocs()
			runtime.GC()
			defer reportCPU(b)()
			for range b.N {
				sub := &subscription{path: "/m/", q: new(coalescer)}
				s.Subscribe(sub, fromScratch, nil)
				_, front := sub.q.drain()
				states := 0
				for done := false; !done; {
					out, done = front.read(out[:0])
					states += len(out)
				}
				sub.q.endFront()
				s.Unsubscribe(sub)
				if states != 11 { // 10 keys and synced
					b.Fatalf("%d events; want 11", states)
				}
			}
		})
	}
}

// BenchmarkListPage asks a page of 100 (?limit=100) of a prefix of
// 1,000,000 keys: the first page, and one from the middle (?after): SPEC
// 3a wants the same cost, O(log n + 100).
func BenchmarkListPage(b *testing.B) {
	srv := benchStore(b, 1_000_000)
	h := srv.routes()
	for _, tt := range []struct{ name, query string }{
		{"first", "/k/?limit=100"},
		{"middle", "/k/?limit=100&after=/k/0500000"},
	} {
		b.Run(tt.name, func(b *testing.B) {
			if w := serveBench(b, h, tt.query); w.h.Get("Link") == "" {
				b.Fatal("no Link: the page was not a page of 100 in the middle of the prefix")
			}
		})
	}
}

// BenchmarkListWithUndo lists the prefix of 10 keys while a listing that
// is never read holds its snapshot open, after 0 and 100,000
// transactions of two keys elsewhere: what the store keeps for that
// snapshot (at most undoBudget), which every read of every listing and
// state then looks through (snapshots.gone).
func BenchmarkListWithUndo(b *testing.B) {
	for _, txns := range []int{0, 100_000} {
		b.Run(fmt.Sprintf("txns=%d", txns), func(b *testing.B) {
			srv := newBenchServer(b, 0)
			s := srv.store
			sn := s.openSnapshot() // a listing whose client reads nothing
			defer s.closeSnapshot(sn)
			for i := range txns {
				s.Commit(&txn{ops: []op{{key: fmt.Sprintf("/u/%d/a", i%50_000), value: "1"}, {key: fmt.Sprintf("/u/%d/b", i%50_000), value: "2"}}})
			}
			serveBench(b, srv.routes(), "/m/")
		})
	}
}
