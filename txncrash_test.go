package main

// A transaction is durable as one (SPEC 8, 11): after kill -9 in the
// middle of a flood of transactions, each is there whole or not at all,
// and every acknowledged one is there.

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// pairWriter is one writer's knowledge of its pairs: transaction n sets
// /p/<w>/<n>/a and /p/<w>/<n>/b to n, and every third one also deletes
// the pair of n-3 (both keys, in the same transaction).
type pairWriter struct {
	w       int
	next    int
	present map[int]bool // acknowledged: the pair is there (true) or deleted (false)
	unknown map[int]bool // a transaction touching the pair was cut off by the kill
	c       *http.Client // this round's
}

func pairKey(w, n int, half string) string { return fmt.Sprintf("/p/%d/%d/%s", w, n, half) }

// TestTxnCrash runs the real server (this test binary, as main) with
// -data in a child process, floods it with two- and four-key
// transactions from several writers, kills it with SIGKILL after a
// random number of acknowledgements, starts it again on the same
// directory and checks, round after round: every pair is whole (both
// keys, the same value, revision 0) or absent; every acknowledged pair
// is there, and every acknowledged deletion holds; and of a transaction
// cut off by the kill, all or nothing is there. With ATOMKV_LOAD=1, more
// rounds and writers.
func TestTxnCrash(t *testing.T) {
	rounds, writers := 3, 4
	if os.Getenv("ATOMKV_LOAD") != "" {
		rounds, writers = 20, 8
	}
	for _, mode := range []string{"1s", "never"} {
		t.Run("fsync "+mode, func(t *testing.T) { txnCrashRounds(t, mode, rounds, writers) })
	}
}

func txnCrashRounds(t *testing.T, mode string, rounds, nw int) {
	dir := t.TempDir()
	ws := make([]*pairWriter, nw)
	for w := range ws {
		ws[w] = &pairWriter{w: w, present: map[int]bool{}, unknown: map[int]bool{}}
	}
	acked, cuts := 0, 0
	for round := range rounds + 1 {
		child := startCrashChild(t, dir, mode)
		url := "http://" + child.addr
		whole, absent, cut := checkPairs(t, url, ws, round)
		cuts += cut
		if round == rounds {
			t.Logf("%d rounds, %d transactions acknowledged, %d pairs touched by one cut off; at the end %d pairs whole, %d absent", rounds, acked, cuts, whole, absent)
			return
		}
		// A flood, and a kill after a random number of acknowledgements.
		var count atomic.Int64
		kill := 20 + rand.Int64N(300)
		killed := make(chan struct{})
		var once sync.Once
		var wg sync.WaitGroup
		for _, pw := range ws {
			pw.c = &http.Client{Transport: &http.Transport{}}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer pw.c.CloseIdleConnections()
				for floodPair(url, pw) {
					if count.Add(1) == kill {
						once.Do(func() { close(killed) })
					}
				}
			}()
		}
		go func() { wg.Wait(); once.Do(func() { close(killed) }) }() // the writers stopped first: a failure
		<-killed
		child.cmd.Process.Kill()
		child.cmd.Wait()
		wg.Wait()
		if count.Load() < kill {
			t.Fatalf("round %d: the writers stopped after %d acknowledgements, before the kill", round, count.Load())
		}
		acked += int(count.Load())
	}
}

// floodPair sends the writer's next transaction and reports whether the
// server answered it (it must apply it: no other writer touches the
// writer's keys).
func floodPair(url string, pw *pairWriter) bool {
	n := pw.next
	ops := []string{
		fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, pairKey(pw.w, n, "a"), n),
		fmt.Sprintf(`{"op":"set","key":%q,"value":%d}`, pairKey(pw.w, n, "b"), n),
	}
	old := -1
	if n%3 == 2 && n >= 3 {
		old = n - 3
		ops = append(ops,
			fmt.Sprintf(`{"op":"delete","key":%q}`, pairKey(pw.w, old, "a")),
			fmt.Sprintf(`{"op":"delete","key":%q}`, pairKey(pw.w, old, "b")))
	}
	pw.unknown[n] = true
	if old >= 0 {
		pw.unknown[old] = true
	}
	resp, err := pw.c.Post(url+"/", "application/json", strings.NewReader(`{"ops":[`+strings.Join(ops, ",")+`]}`))
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return false // a failure the check after the restart will name
	}
	pw.next++
	pw.present[n] = true
	delete(pw.unknown, n)
	if old >= 0 {
		pw.present[old] = false
		delete(pw.unknown, old)
	}
	return true
}

// checkPairs reads every key under /p/ (one listing, one point of the
// change sequence) and checks the pairs against what the writers know;
// a pair a cut-off transaction touched takes the state found, which must
// be whole or absent. It returns how many pairs are whole and absent,
// and how many a cut-off transaction touched.
func checkPairs(t *testing.T, url string, ws []*pairWriter, round int) (whole, absent, cut int) {
	t.Helper()
	r := do(t, "GET", url+"/p/", "")
	if r.code != 200 {
		t.Fatalf("round %d: listing: %d %s", round, r.code, r.body)
	}
	var items []struct {
		Key      string
		Value    json.RawMessage
		Revision int64
	}
	if err := json.Unmarshal([]byte(r.body), &items); err != nil {
		t.Fatalf("round %d: listing: %v", round, err)
	}
	type pair struct{ a, b string }
	found := map[[2]int]*pair{}
	for _, it := range items {
		var w, n int
		var half string
		if _, err := fmt.Sscanf(strings.ReplaceAll(it.Key, "/", " "), " p %d %d %s", &w, &n, &half); err != nil || w >= len(ws) {
			t.Fatalf("round %d: unexpected key %s", round, it.Key)
		}
		p := found[[2]int{w, n}]
		if p == nil {
			p = &pair{}
			found[[2]int{w, n}] = p
		}
		v := fmt.Sprintf("%s@%d", it.Value, it.Revision)
		if half == "a" {
			p.a = v
		} else {
			p.b = v
		}
	}
	for k, p := range found {
		if want := fmt.Sprintf("%d@0", k[1]); p.a != want || p.b != want {
			t.Errorf("round %d: pair %d/%d is a=%q b=%q; want both %q: a transaction applied in part", round, k[0], k[1], p.a, p.b, want)
		}
	}
	for _, pw := range ws {
		for n := range pw.next + 1 {
			there := found[[2]int{pw.w, n}] != nil
			present, acked := pw.present[n]
			switch {
			case pw.unknown[n]:
				pw.present[n] = there
				delete(pw.unknown, n)
				cut++
			case acked && present && !there:
				t.Errorf("round %d: pair %d/%d is missing; its transaction was acknowledged", round, pw.w, n)
			case acked && !present && there:
				t.Errorf("round %d: pair %d/%d is there; its deletion was acknowledged", round, pw.w, n)
			case !acked && there:
				t.Errorf("round %d: pair %d/%d is there; it was never sent", round, pw.w, n)
			}
			if pw.present[n] && there {
				whole++
			} else {
				absent++
			}
		}
		// A transaction cut off after its pair landed: the writer goes on
		// after it, so that it never sets a pair twice.
		for found[[2]int{pw.w, pw.next}] != nil {
			pw.next++
		}
	}
	return whole, absent, cut
}
