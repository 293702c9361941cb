package main

// What a transaction saves (SPEC 11, "Cost"): one transaction of 10 sets
// against 10 single writes, in memory and with -data -fsync always.

import (
	"fmt"
	"io"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// benchServer serves a server with args over httptest, its data loaded
// as run does, until the benchmark ends.
func benchServer(b *testing.B, args ...string) (*server, string) {
	b.Helper()
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := newServer(cfg, discardLogger())
	if err != nil {
		b.Fatal(err)
	}
	var data *dataDir
	if cfg.data != "" {
		if data, err = openData(cfg.data, cfg.fsync, srv.store, discardLogger()); err != nil {
			b.Fatal(err)
		}
	}
	hs := httptest.NewServer(srv.routes())
	b.Cleanup(func() {
		hs.Close()
		srv.close()
		if data != nil {
			srv.store.expiry.stop()
			data.close()
		}
	})
	return srv, hs.URL
}

// BenchmarkTxnKeys writes 10 keys per iteration twice over, alternately,
// in the same run: as one transaction of 10 sets (POST /), and as 10
// single writes (POST /key), one client waiting for each answer; and
// reports the keys written per second each way and their ratio (SPEC 11
// wants the transaction at least 3× as fast in memory, 5× with -fsync
// always). "store" does the same on the store itself, without HTTP:
// what the transaction saves inside the server.
func BenchmarkTxnKeys(b *testing.B) {
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"memory", nil},
		{"fsync=always", []string{"-data", "", "-fsync", "always"}},
	} {
		for _, via := range []string{"http", "store"} {
			b.Run(mode.name+"/"+via, func(b *testing.B) {
				args := mode.args
				if len(args) > 0 {
					args = []string{"-data", b.TempDir(), "-fsync", "always"}
				}
				srv, url := benchServer(b, args...)
				txnKeys := func(i int) {
					var ops []string
					for k := range 10 {
						ops = append(ops, fmt.Sprintf(`{"op":"set","key":"/t/%d/%d","value":%d}`, i%100, k, i))
					}
					body := `{"ops":[` + strings.Join(ops, ",") + `]}`
					if via == "store" {
						t := &txn{}
						for k := range 10 {
							t.ops = append(t.ops, op{key: fmt.Sprintf("/t/%d/%d", i%100, k), value: strconv.Itoa(i)})
						}
						if err := srv.store.Commit(t); err != nil {
							b.Fatal(err)
						}
						return
					}
					benchPost(b, url+"/", body)
				}
				singleKeys := func(i int) {
					for k := range 10 {
						key := fmt.Sprintf("/s/%d/%d", i%100, k)
						if via == "store" {
							if _, err := srv.store.Set(key, strconv.Itoa(i), 0); err != nil {
								b.Fatal(err)
							}
							continue
						}
						benchPost(b, url+key, strconv.Itoa(i))
					}
				}
				var inTxn, single time.Duration
				b.ResetTimer()
				for i := range b.N {
					start := time.Now()
					txnKeys(i)
					mid := time.Now()
					singleKeys(i)
					inTxn += mid.Sub(start)
					single += time.Since(mid)
				}
				b.ReportMetric(float64(10*b.N)/inTxn.Seconds(), "txn-keys/s")
				b.ReportMetric(float64(10*b.N)/single.Seconds(), "single-keys/s")
				b.ReportMetric(single.Seconds()/inTxn.Seconds(), "txn/single")
			})
		}
	}
}

func benchPost(b *testing.B, url, body string) {
	resp, err := client.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("POST %s: %d", url, resp.StatusCode)
	}
}
