package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestStoreRevisions(t *testing.T) {
	s := NewStore(0, nil)
	for want := int64(0); want < 3; want++ {
		e, err := s.Set("/k", strconv.FormatInt(want, 10), 0)
		if err != nil || e.revision != want {
			t.Fatalf("Set: got %v, %v; want revision %d", e, err, want)
		}
	}
	if _, err := s.CompareAndSwap("/k", "x", 2, 0); !errors.Is(err, errConflict) {
		t.Errorf("CAS at the current revision: got %v; want a conflict", err)
	}
	var c *conflictError
	if _, err := s.CompareAndSwap("/k", "x", 9, 0); !errors.As(err, &c) || c.cur().revision != 2 {
		t.Errorf("CAS conflict: got %v; want one holding revision 2", err)
	}
	if existed, err := s.Delete("/k", -1); !existed || err != nil {
		t.Errorf("Delete: got %v, %v", existed, err)
	}
	if e := s.Get("/k"); e != nil {
		t.Errorf("Get after Delete: got %v; want nil", e)
	}
	if e, _ := s.Set("/k", "1", 0); e.revision != 0 {
		t.Errorf("Set after Delete: revision %d; want 0", e.revision)
	}
	if s.Len() != 1 {
		t.Errorf("Len: got %d; want 1", s.Len())
	}
}

// TestStoreReleasesSlots checks that missing keys leave nothing behind:
// a failed CAS or a delete must not keep a slot in the map.
func TestStoreReleasesSlots(t *testing.T) {
	s := NewStore(0, nil)
	s.CompareAndSwap("/a", "1", 5, 0)
	s.Delete("/b", 3)
	s.Set("/c", "1", 0)
	s.Delete("/c", -1)
	n := 0
	s.keys.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Errorf("slots left in the map: %d; want 0", n)
	}
}

// checkSequential checks that revs, in any order, are exactly 1..len(revs).
func checkSequential(t *testing.T, revs []int64) {
	t.Helper()
	revs = slices.Clone(revs)
	slices.Sort(revs)
	for i, r := range revs {
		if r != int64(i+1) {
			t.Fatalf("successful revisions are not 1..%d: position %d holds %d", len(revs), i, r)
		}
	}
}

// TestConcurrentCAS races 32 goroutines, each trying 200 increments of one
// counter by compare-and-swap, interleaved with deletes and sets of other
// keys. Every success must have a distinct revision, with no gaps, and the
// counter must equal the number of successes: no update lost.
func TestConcurrentCAS(t *testing.T) {
	s := NewStore(0, nil)
	s.Set("/counter", "0", 0)
	var mu sync.Mutex
	var revs []int64
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			other := fmt.Sprintf("/other/%d", g%4)
			for i := range 200 {
				cur := s.Get("/counter")
				n, _ := strconv.Atoi(cur.value)
				if _, err := s.CompareAndSwap("/counter", strconv.Itoa(n+1), cur.revision+1, 0); err == nil {
					mu.Lock()
					revs = append(revs, cur.revision+1)
					mu.Unlock()
				} else if !errors.Is(err, errConflict) {
					t.Error(err)
				}
				if i%3 == 0 {
					s.Delete(other, -1)
				} else {
					s.Set(other, "1", 0)
				}
			}
		}()
	}
	wg.Wait()
	checkSequential(t, revs)
	final := s.Get("/counter")
	if final.value != strconv.Itoa(len(revs)) || final.revision != int64(len(revs)) {
		t.Errorf("final: value %s revision %d; want %d successful CAS", final.value, final.revision, len(revs))
	}
}

// TestStorePublishOrder checks the publish hook sees each key's changes
// in revision order, and every change numbered one more than the one
// published before it, even with many writers.
func TestStorePublishOrder(t *testing.T) {
	s := NewStore(0, nil)
	last := make(map[string]int64)
	var mu sync.Mutex
	var bad, gaps atomic.Int64
	prevSeq := s.published.Load()
	s.publish = func(c change) {
		mu.Lock()
		defer mu.Unlock()
		rev := int64(noRevision)
		if c.e != nil {
			rev = c.e.revision
		}
		if prev, ok := last[c.key]; ok && rev != noRevision && rev != prev+1 {
			bad.Add(1)
		}
		last[c.key] = rev
		if c.seq != prevSeq+1 {
			gaps.Add(1)
		}
		prevSeq = c.seq
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				key := fmt.Sprintf("/k%d", i%5)
				if (i+g)%50 == 0 {
					s.Delete(key, -1)
				} else {
					s.Set(key, "1", 0)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Errorf("%d changes published out of revision order", bad.Load())
	}
	if gaps.Load() != 0 {
		t.Errorf("%d changes published out of sequence order", gaps.Load())
	}
	if s.published.Load() != prevSeq {
		t.Errorf("published up to %d; the last change was %d", s.published.Load(), prevSeq)
	}
}

func BenchmarkStoreGet(b *testing.B) {
	s := NewStore(0, nil)
	keys := benchKeys(10000)
	for _, k := range keys {
		s.Set(k, `{"v":1}`, 0)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if s.Get(keys[i%len(keys)]) == nil {
				b.Fatal("missing")
			}
			i++
		}
	})
}

func BenchmarkStoreSet(b *testing.B) {
	s := NewStore(0, nil)
	keys := benchKeys(10000)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.Set(keys[i%len(keys)], `{"v":1}`, 0); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}

func benchKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("/k/%06d", i)
	}
	return keys
}

// BenchmarkMemoryPerKey stores 1,000,000 keys like /k/123456 with value
// {"v":1}, without and with a TTL, and reports the heap they take beyond
// their key and value bytes. Run it with -benchtime=1x.
func BenchmarkMemoryPerKey(b *testing.B) {
	for _, ttl := range []time.Duration{0, time.Hour} {
		b.Run(fmt.Sprintf("ttl=%v", ttl), func(b *testing.B) {
			const n = 1_000_000
			for range b.N {
				value := `{"v":1}`
				payload := 0
				before := heapInUse()
				s := NewStore(0, nil)
				for i := range n {
					// a fresh key and value per write, as a request would bring
					k := fmt.Sprintf("/k/%06d", i)
					payload += len(k) + len(value)
					s.Set(k, strings.Clone(value), ttl)
				}
				after := heapInUse()
				b.ReportMetric(float64(after-before)/n, "heap-B/key")
				b.ReportMetric(float64(after-before-uint64(payload))/n, "overhead-B/key")
				runtime.KeepAlive(s)
			}
		})
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// FuzzCompactValue: whatever is accepted as a value is valid JSON, already
// compact, and means what the input meant, numbers as written.
func FuzzCompactValue(f *testing.F) {
	for _, s := range []string{`1`, `null`, ` { "z" : 1, "a" : [1 , 2.50] } `, `12345678901234567890`, `1e400`, `"\u00e9\n"`, `{`, `1 2`} {
		f.Add([]byte(s))
	}
	decode := func(b []byte) (any, error) {
		d := json.NewDecoder(bytes.NewReader(b))
		d.UseNumber()
		var v any
		return v, d.Decode(&v)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := compactValue(in, math.MaxInt64)
		if err != nil {
			if json.Valid(in) {
				t.Fatalf("valid JSON %q refused: %v", in, err)
			}
			return
		}
		if !json.Valid([]byte(out)) {
			t.Fatalf("%q compacted to invalid %q", in, out)
		}
		if again, _ := compactValue([]byte(out), math.MaxInt64); again != out {
			t.Fatalf("%q is not compact: %q", out, again)
		}
		a, errA := decode(in)
		b, errB := decode([]byte(out))
		if errA != nil || errB != nil || !reflect.DeepEqual(a, b) {
			t.Fatalf("%q compacted to %q, which means something else", in, out)
		}
	})
}
