package main

import (
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// The alternatives the ordered index was measured against, and the
// benchmarks that compare them (docs/performance.md).

// skipList is the other alternative: a skip list of slots (Pugh, with
// p = 1/4, as Redis and LevelDB), each node a slot pointer and a tower of
// 1.33 next pointers on average.
type skipList struct {
	mu    sync.RWMutex
	head  skipNode // its tower is skipMaxLevel high
	level int      // the highest tower's
	count int
	rng   uint64
}

type skipNode struct {
	sl   *slot
	next []*skipNode
}

const skipMaxLevel = 16 // 4^16 keys

// seek returns, for each level, the last node before key.
func (s *skipList) seek(key string, prev *[skipMaxLevel]*skipNode) {
	if s.head.next == nil {
		s.head.next = make([]*skipNode, skipMaxLevel)
	}
	p := &s.head
	for l := s.level - 1; l >= 0; l-- {
		for q := p.next[l]; q != nil && q.sl.key < key; q = p.next[l] {
			p = q
		}
		prev[l] = p
	}
	for l := s.level; l < skipMaxLevel; l++ {
		prev[l] = &s.head
	}
}

func (s *skipList) insert(sl *slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var prev [skipMaxLevel]*skipNode
	s.seek(sl.key, &prev)
	if q := prev[0].next[0]; q != nil && q.sl.key == sl.key {
		q.sl = sl
		return
	}
	level := 1
	for s.rng = s.rng*6364136223846793005 + 1442695040888963407; level < skipMaxLevel && (s.rng>>(62-2*level))&3 == 0; level++ {
	}
	nd := &skipNode{sl: sl, next: make([]*skipNode, level)}
	for l := range level {
		nd.next[l], prev[l].next[l] = prev[l].next[l], nd
	}
	s.level = max(s.level, level)
	s.count++
}

func (s *skipList) remove(sl *slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var prev [skipMaxLevel]*skipNode
	s.seek(sl.key, &prev)
	q := prev[0].next[0]
	if q == nil || q.sl != sl {
		return
	}
	for l := range q.next {
		prev[l].next[l] = q.next[l]
	}
	s.count--
}

func (s *skipList) read(dst []*slot, from, to string, max int) []*slot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.head.next == nil {
		return dst
	}
	p := &s.head
	for l := s.level - 1; l >= 0; l-- {
		for q := p.next[l]; q != nil && q.sl.key < from; q = p.next[l] {
			p = q
		}
	}
	for q := p.next[0]; q != nil && max > 0 && (to == "" || q.sl.key < to); q, max = q.next[0], max-1 {
		dst = append(dst, q.sl)
	}
	return dst
}

func (s *skipList) len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.count
}

// benchStructures are the ordered sets the benchmarks compare: the B-tree
// with four node sizes (its leaf's bytes), and the alternatives.
var benchStructures = []struct {
	name string
	new  func() orderedSlots
}{
	{"btree-512B", func() orderedSlots { return newIndexOfSize(57) }},
	{"btree-1KB", func() orderedSlots { return newIndexOfSize(120) }},
	{"btree-2KB", func() orderedSlots { return newIndexOfSize(248) }},
	{"btree-4KB", func() orderedSlots { return newIndexOfSize(504) }},
	{"skiplist", func() orderedSlots { return new(skipList) }},
	{"slice", func() orderedSlots { return new(sortedSlots) }},
}

// slowAt skips a benchmark of the sorted slice's O(n) inserts or removes
// past 100,000 keys, where it would take minutes.
func slowAt(b *testing.B, name string) {
	if name == "slice" && b.N > 100_000 {
		b.Skip("O(n) an insert or remove: minutes at this size")
	}
}

// BenchmarkIndexInsert inserts b.N keys into an empty set, in ascending or
// random order, and reports the heap the set then takes a key and how full
// a B-tree's nodes are. With -benchtime 1000000x, the figures are for a
// million keys. Its times, one structure after the other, swing with the
// machine's load: BenchmarkIndexSideBySide compares them.
func BenchmarkIndexInsert(b *testing.B) {
	for _, order := range []string{"seq", "random"} {
		for _, st := range benchStructures {
			b.Run(order+"/"+st.name, func(b *testing.B) {
				if order == "random" {
					slowAt(b, st.name)
				}
				slots := benchSlots(b.N, order == "random")
				s := st.new()
				before := heapAllocated()
				b.ResetTimer()
				for _, sl := range slots {
					s.insert(sl)
				}
				b.StopTimer()
				b.ReportMetric(float64(heapAllocated()-before)/float64(b.N), "B/key")
				if x, ok := s.(*index); ok {
					f, _ := fill(x)
					b.ReportMetric(100*f, "fill%")
				}
				runtime.KeepAlive(s)
				runtime.KeepAlive(slots) // counted in before
			})
		}
	}
}

// heapAllocated returns the bytes of the heap's live objects, each rounded
// up to its size class: what a structure built between two calls costs,
// to the byte (HeapInuse, which BenchmarkMemoryPerKey reads for the whole
// store, counts 8 KB spans, coarse for a structure of a few MB).
func heapAllocated() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// benchSets holds, by structure, a set of the same million slots, built
// once for the reads of BenchmarkIndexSideBySide: in random order, but for the slice, whose
// layout does not depend on it.
var (
	benchSets      = map[string]orderedSlots{}
	benchSetSlots  []*slot
	benchSetRandom []*slot
)

const benchSetKeys = 1_000_000

func benchSet(name string, new func() orderedSlots) orderedSlots {
	if s, ok := benchSets[name]; ok {
		return s
	}
	if benchSetSlots == nil {
		benchSetSlots = benchSlots(benchSetKeys, false)
		benchSetRandom = slices.Clone(benchSetSlots)
		rand.New(rand.NewPCG(1, 2)).Shuffle(benchSetKeys, func(i, j int) {
			benchSetRandom[i], benchSetRandom[j] = benchSetRandom[j], benchSetRandom[i]
		})
	}
	slots := benchSetRandom
	if name == "slice" {
		slots = benchSetSlots
	}
	s := new()
	for _, sl := range slots {
		s.insert(sl)
	}
	benchSets[name] = s
	return s
}

// BenchmarkIndexSideBySide runs each operation on every structure,
// interleaved: each batch of 1,000 runs on each structure in turn, so a
// busy moment of a shared machine slows them alike and their ratios hold.
// It reports each structure's ns per operation, over b.N operations: with
// -benchtime 1000000x, inserting and removing a million keys and reading
// a million times from a million. The sorted slice sits out random inserts
// and removes (minutes at O(n) each).
func BenchmarkIndexSideBySide(b *testing.B) {
	const batch = 1000
	for _, op := range []string{"insert-seq", "insert-random", "remove", "read-10", "read-100"} {
		b.Run(op, func(b *testing.B) {
			var slots []*slot
			if op == "insert-seq" || op == "insert-random" || op == "remove" {
				slots = benchSlots(b.N, op != "insert-seq")
			}
			var names []string
			var sets []orderedSlots
			for _, st := range benchStructures {
				if st.name == "slice" && (op == "insert-random" || op == "remove") {
					continue
				}
				names = append(names, st.name)
				switch op {
				case "insert-seq", "insert-random":
					sets = append(sets, st.new())
				case "remove":
					s := st.new()
					for _, sl := range slots {
						s.insert(sl)
					}
					sets = append(sets, s)
				default:
					sets = append(sets, benchSet(st.name, st.new))
				}
			}
			if op == "remove" { // in another order than inserted
				r := rand.New(rand.NewPCG(7, 8))
				r.Shuffle(len(slots), func(i, j int) { slots[i], slots[j] = slots[j], slots[i] })
			}
			k := 10
			if op == "read-100" {
				k = 100
			}
			froms := make([]string, batch)
			r := rand.New(rand.NewPCG(9, 10))
			for i := range froms {
				froms[i] = benchKey(benchSetKeys/4 + r.IntN(benchSetKeys/2))
			}
			dst := make([]*slot, 0, 100)
			elapsed := make([]time.Duration, len(sets))
			b.ResetTimer()
			for start := 0; start < b.N; start += batch {
				end := min(start+batch, b.N)
				for j, s := range sets {
					t0 := time.Now()
					switch op {
					case "insert-seq", "insert-random":
						for _, sl := range slots[start:end] {
							s.insert(sl)
						}
					case "remove":
						for _, sl := range slots[start:end] {
							s.remove(sl)
						}
					default:
						for _, from := range froms[:end-start] {
							dst = s.read(dst[:0], from, "", k)
						}
					}
					elapsed[j] += time.Since(t0)
				}
			}
			b.StopTimer()
			for j, name := range names {
				b.ReportMetric(float64(elapsed[j].Nanoseconds())/float64(b.N), name+"-ns/op")
			}
			if op == "remove" {
				for j, s := range sets {
					if s.len() != 0 {
						b.Fatalf("%s: %d keys left", names[j], s.len())
					}
				}
			}
		})
	}
}
