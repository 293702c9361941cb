package main

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
)

// orderedSlots is what the index does, which its alternatives do too: the
// tests check the index against the simplest (sortedSlots), and the
// benchmarks measure it against them.
type orderedSlots interface {
	insert(sl *slot)
	remove(sl *slot)
	read(dst []*slot, from, to string, max int) []*slot
	len() int
}

// newIndexOfSize returns an empty index whose nodes hold size items. The
// size is taken from the root: nodes are made the size of the node that
// splits.
func newIndexOfSize(size int) *index {
	return &index{root: newIndexNode(size, true)}
}

// sortedSlots is a sorted slice of slots: the model the tests hold the
// index to, and the alternative with the least memory (8 bytes a key, plus
// the slice's spare capacity) at O(n) an insert or remove.
type sortedSlots struct {
	mu    sync.RWMutex
	items []*slot
}

func (s *sortedSlots) search(key string) (int, bool) {
	return slices.BinarySearchFunc(s.items, key, func(sl *slot, key string) int {
		return strings.Compare(sl.key, key)
	})
}

func (s *sortedSlots) insert(sl *slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i, found := s.search(sl.key); found {
		s.items[i] = sl
	} else {
		s.items = slices.Insert(s.items, i, sl)
	}
}

func (s *sortedSlots) remove(sl *slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i, found := s.search(sl.key); found && s.items[i] == sl {
		s.items = slices.Delete(s.items, i, i+1)
	}
}

func (s *sortedSlots) read(dst []*slot, from, to string, max int) []*slot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i, _ := s.search(from); i < len(s.items) && max > 0; i, max = i+1, max-1 {
		if to != "" && s.items[i].key >= to {
			break
		}
		dst = append(dst, s.items[i])
	}
	return dst
}

func (s *sortedSlots) len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.items)
}

// get returns the slot stored under key, or nil.
func (s *sortedSlots) get(key string) *slot {
	if i, found := s.search(key); found {
		return s.items[i]
	}
	return nil
}

// checkIndex fails t unless x is a well-formed B-tree holding exactly
// want, in order: every node the root's size, every node but the root
// non-empty, every inner node one child more than items, every leaf at the
// same depth, the items in strictly ascending order, and the count right.
func checkIndex(t testing.TB, x *index, want []*slot) {
	t.Helper()
	x.mu.RLock()
	defer x.mu.RUnlock()
	if x.root == nil {
		if len(want) != 0 || x.count != 0 {
			t.Fatalf("nil root with count %d; want %d slots", x.count, len(want))
		}
		return
	}
	var got []*slot
	leafDepth := -1
	var walk func(nd *indexNode, depth int) string
	walk = func(nd *indexNode, depth int) string {
		switch {
		case cap(nd.items) != cap(x.root.items):
			return fmt.Sprintf("node of %d items under a root of %d", cap(nd.items), cap(x.root.items))
		case nd != x.root && len(nd.items) == 0:
			return "empty node below the root"
		case nd.children == nil && leafDepth == -1:
			leafDepth = depth
		case nd.children == nil && depth != leafDepth:
			return fmt.Sprintf("leaves at depths %d and %d", leafDepth, depth)
		case nd.children != nil && len(nd.children) != len(nd.items)+1:
			return fmt.Sprintf("%d children for %d items", len(nd.children), len(nd.items))
		}
		for i, sl := range nd.items {
			if nd.children != nil {
				if err := walk(nd.children[i], depth+1); err != "" {
					return err
				}
			}
			got = append(got, sl)
		}
		if nd.children != nil {
			return walk(nd.children[len(nd.items)], depth+1)
		}
		return ""
	}
	if err := walk(x.root, 0); err != "" {
		t.Fatal(err)
	}
	for i := 1; i < len(got); i++ {
		if got[i-1].key >= got[i].key {
			t.Fatalf("in-order walk: %q before %q", got[i-1].key, got[i].key)
		}
	}
	if x.count != len(got) {
		t.Fatalf("count %d; the tree holds %d", x.count, len(got))
	}
	if !slices.Equal(got, want) {
		t.Fatalf("in-order walk %q; want %q", slotKeys(got), slotKeys(want))
	}
}

func slotKeys(slots []*slot) []string {
	keys := make([]string, len(slots))
	for i, sl := range slots {
		keys[i] = sl.key
	}
	return keys
}

// readChunked reads from..to in chunks of max, each resuming just after
// the last key of the one before, as a listing pages.
func readChunked(s orderedSlots, from, to string, max int) []*slot {
	var all []*slot
	for {
		chunk := s.read(nil, from, to, max)
		all = append(all, chunk...)
		if len(chunk) < max {
			return all
		}
		from = chunk[len(chunk)-1].key + "\x00"
	}
}

// checkRead fails t unless s and the model read the same from..to, whole
// and in chunks.
func checkRead(t testing.TB, s orderedSlots, model *sortedSlots, from, to string) {
	t.Helper()
	for _, max := range []int{0, 1, 3, 1 << 30} {
		got, want := s.read(nil, from, to, max), model.read(nil, from, to, max)
		if !slices.Equal(got, want) {
			t.Fatalf("read(%q, %q, %d) = %q; want %q", from, to, max, slotKeys(got), slotKeys(want))
		}
	}
	got, want := readChunked(s, from, to, 3), model.read(nil, from, to, 1<<30)
	if !slices.Equal(got, want) {
		t.Fatalf("read(%q, %q) by 3 = %q; want %q", from, to, slotKeys(got), slotKeys(want))
	}
}

// trickyKeys share long prefixes and straddle the boundaries a prefix read
// must get right: "/a/" and its end "/a0", "/a" and "/a.", bytes past
// ASCII and 0xff.
var trickyKeys = []string{
	"/", "/a", "/a.", "/a/", "/a/b", "/a/b/c", "/a/b/c/d", "/a/b0", "/a/b.", "/a0", "/a0/b",
	"/b", "/a-", "/a/\xff", "/a\xff", "/a\xff\xff/b", "/ключ/значение", "/hello world",
	"/" + strings.Repeat("x", 300), "/" + strings.Repeat("x", 300) + "/y", "/" + strings.Repeat("x", 299) + "0",
}

// randomKeys returns n keys built on the tricky ones, with short random
// tails from an alphabet of separators and their neighbours.
func randomKeys(r *rand.Rand, n int) []string {
	tails := []string{"/", "0", ".", "a", "b", "/a", "\x00", "é", "\xff"}
	keys := make([]string, n)
	for i := range keys {
		k := trickyKeys[r.IntN(len(trickyKeys))]
		for range r.IntN(4) {
			k += tails[r.IntN(len(tails))]
		}
		keys[i] = k
	}
	return keys
}

// TestIndexAgainstSortedSlice runs random inserts, removes and reads on
// indexes of several node sizes, small ones to make deep trees, and holds
// each to a sorted slice after every batch.
func TestIndexAgainstSortedSlice(t *testing.T) {
	seeds := 20
	if testing.Short() {
		seeds = 5
	}
	for _, size := range []int{3, 4, 5, 8, indexNodeItems} {
		for seed := range seeds {
			t.Run(fmt.Sprintf("size=%d/seed=%d", size, seed), func(t *testing.T) {
				r := rand.New(rand.NewPCG(uint64(seed), uint64(size)))
				keys := randomKeys(r, 50+r.IntN(1500))
				x, model := newIndexOfSize(size), new(sortedSlots)
				if seed%2 == 1 {
					x = new(index) // the zero index, in its own size
				}
				// Grow, shrink, grow: a phase inserts with probability p.
				for _, p := range []float64{0.8, 0.5, 0.1, 0.7, 0.3} {
					for range 20 {
						for range 25 {
							k := keys[r.IntN(len(keys))]
							cur := model.get(k)
							switch {
							case r.Float64() < p:
								sl := &slot{key: k}
								x.insert(sl)
								model.insert(sl)
							case cur != nil && r.IntN(5) > 0:
								x.remove(cur)
								model.remove(cur)
							default:
								x.remove(&slot{key: k}) // another slot of k, or a missing key: no change
							}
						}
						checkIndex(t, x, model.items)
						if x.len() != model.len() {
							t.Fatalf("len() = %d; want %d", x.len(), model.len())
						}
						prefix := keys[r.IntN(len(keys))]
						prefix = prefix[:r.IntN(len(prefix)+1)]
						checkRead(t, x, model, prefix, prefixEnd(prefix))
						from, to := keys[r.IntN(len(keys))], keys[r.IntN(len(keys))]
						checkRead(t, x, model, from, to)
						checkRead(t, x, model, from, "")
					}
				}
			})
		}
	}
}

// TestIndexPrefixBoundaries reads each prefix of the tricky keys: a prefix
// ending in "/" takes its children and nothing of "/a0" or "/a.".
func TestIndexPrefixBoundaries(t *testing.T) {
	x, model := newIndexOfSize(3), new(sortedSlots)
	for _, k := range trickyKeys {
		sl := &slot{key: k}
		x.insert(sl)
		model.insert(sl)
	}
	checkIndex(t, x, model.items)
	got := slotKeys(x.read(nil, "/a/", prefixEnd("/a/"), 100))
	want := []string{"/a/", "/a/b", "/a/b.", "/a/b/c", "/a/b/c/d", "/a/b0", "/a/\xff"}
	if !slices.Equal(got, want) {
		t.Errorf("read of /a/ = %q; want %q", got, want)
	}
	for _, k := range trickyKeys {
		for n := range len(k) + 1 {
			checkRead(t, x, model, k[:n], prefixEnd(k[:n]))
		}
	}
}

func TestPrefixEnd(t *testing.T) {
	for _, tt := range []struct{ prefix, want string }{
		{"/a/", "/a0"},
		{"/", "0"},
		{"/room/42/", "/room/420"},
		{"/a", "/b"},
		{"/a\xff", "/b"},
		{"/a\xfe", "/a\xff"},
		{"/a\xff\xff", "/b"},
		{"\xff", ""},
		{"\xff\xff", ""},
		{"", ""},
	} {
		if got := prefixEnd(tt.prefix); got != tt.want {
			t.Errorf("prefixEnd(%q) = %q; want %q", tt.prefix, got, tt.want)
		}
	}
}

// FuzzIndex drives an index with small nodes from the fuzzer's bytes,
// three a step (what, which key, how), and holds it to a sorted slice.
func FuzzIndex(f *testing.F) {
	f.Add([]byte{0, 0, 1, 0, 1, 1, 0, 2, 0, 3, 4, 0x17})
	f.Add([]byte("insert them all, read a few, remove some: \x00\x01\x02\x03\x04\x05\x06\x07\x08\x09"))
	f.Fuzz(func(t *testing.T, steps []byte) {
		x, model := newIndexOfSize(3+len(steps)%4), new(sortedSlots)
		keys := trickyKeys
		for ; len(steps) >= 3; steps = steps[3:] {
			k, how := keys[int(steps[1])%len(keys)], steps[2]
			switch steps[0] % 4 {
			case 0, 1:
				sl := &slot{key: k}
				x.insert(sl)
				model.insert(sl)
			case 2:
				sl := model.get(k)
				if sl == nil || how&1 == 1 {
					sl = &slot{key: k}
				}
				x.remove(sl)
				model.remove(sl)
			case 3:
				prefix := k[:min(len(k), int(how>>3))]
				to := prefixEnd(prefix)
				if how&4 != 0 {
					to = keys[int(how)%len(keys)]
				}
				max := int(how & 3)
				if got, want := x.read(nil, prefix, to, max), model.read(nil, prefix, to, max); !slices.Equal(got, want) {
					t.Fatalf("read(%q, %q, %d) = %q; want %q", prefix, to, max, slotKeys(got), slotKeys(want))
				}
				if max > 0 {
					if got, want := readChunked(x, prefix, to, max), model.read(nil, prefix, to, 1<<30); !slices.Equal(got, want) {
						t.Fatalf("read(%q, %q) by %d = %q; want %q", prefix, to, max, slotKeys(got), slotKeys(want))
					}
				}
			}
		}
		checkIndex(t, x, model.items)
	})
}

// TestIndexConcurrent has writers insert and remove while readers read
// chunks, each checked sorted and within its bounds; run it with -race.
// Each writer has its own keys, so at the end the index holds what the
// writers' models hold.
func TestIndexConcurrent(t *testing.T) {
	const writers, readers, steps = 4, 4, 2000
	for _, size := range []int{4, indexNodeItems} {
		t.Run(fmt.Sprintf("size=%d", size), func(t *testing.T) {
			x := newIndexOfSize(size)
			models := make([]*sortedSlots, writers)
			errs := make(chan string, readers)
			var wg sync.WaitGroup
			for w := range writers {
				models[w] = new(sortedSlots)
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(w), 1))
					for range steps {
						k := fmt.Sprintf("/w/%d/%03d", r.IntN(1000), w)
						if sl := models[w].get(k); sl != nil && r.IntN(2) == 0 {
							x.remove(sl)
							models[w].remove(sl)
						} else {
							sl := &slot{key: k}
							x.insert(sl)
							models[w].insert(sl)
						}
					}
				})
			}
			for rd := range readers {
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(rd), 2))
					dst := make([]*slot, 0, 64)
					for range steps {
						from := fmt.Sprintf("/w/%d", r.IntN(1000))
						to := prefixEnd(from[:len(from)-r.IntN(2)])
						max := 1 + r.IntN(64)
						dst = x.read(dst[:0], from, to, max)
						if err := checkChunk(dst, from, to, max); err != "" {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			var want []*slot
			for _, m := range models {
				want = append(want, m.items...)
			}
			slices.SortFunc(want, func(a, b *slot) int { return strings.Compare(a.key, b.key) })
			checkIndex(t, x, want)
		})
	}
}

// checkChunk says what is wrong with a chunk read from..to, at most max.
func checkChunk(chunk []*slot, from, to string, max int) string {
	if len(chunk) > max {
		return fmt.Sprintf("read(%q, %q, %d): %d slots", from, to, max, len(chunk))
	}
	for i, sl := range chunk {
		switch {
		case sl.key < from || to != "" && sl.key >= to:
			return fmt.Sprintf("read(%q, %q, %d): %q out of bounds", from, to, max, sl.key)
		case i > 0 && chunk[i-1].key >= sl.key:
			return fmt.Sprintf("read(%q, %q, %d): %q before %q", from, to, max, chunk[i-1].key, sl.key)
		}
	}
	return ""
}

// fill returns the share of x's item capacity in use, and its depth.
func fill(x *index) (share float64, depth int) {
	var items, capacity int
	var walk func(nd *indexNode, d int)
	walk = func(nd *indexNode, d int) {
		items, capacity, depth = items+len(nd.items), capacity+cap(nd.items), max(depth, d)
		for _, c := range nd.children {
			walk(c, d+1)
		}
	}
	walk(x.root, 1)
	return float64(items) / float64(capacity), depth
}

// benchKey is the n-th key of the benchmarks, in the store benchmarks'
// shape, with room for ten million.
func benchKey(n int) string { return fmt.Sprintf("/k/%07d", n) }

// benchSlots returns n slots of keys benchKey(0…n-1), in ascending order
// or shuffled.
func benchSlots(n int, shuffled bool) []*slot {
	slots := make([]*slot, n)
	for i := range slots {
		slots[i] = &slot{key: benchKey(i)}
	}
	if shuffled {
		r := rand.New(rand.NewPCG(1, 2))
		r.Shuffle(n, func(i, j int) { slots[i], slots[j] = slots[j], slots[i] })
	}
	return slots
}

// TestIndexFill checks how full nodes are left by ways keys arrive: nearly
// full by ascending and descending loads, also when several go on at once
// under different prefixes; about 70% by random inserts; and not much less
// by the patterns that defeat the split rule, nor by churn.
func TestIndexFill(t *testing.T) {
	const n = 50_000
	seq := benchSlots(n, false)
	desc := slices.Clone(seq)
	slices.Reverse(desc)
	var prefixes []*slot // 8 writers, each appending under its prefix
	for i := range n / 8 {
		for w := range 8 {
			prefixes = append(prefixes, &slot{key: fmt.Sprintf("/w%d/%07d", w, i)})
		}
	}
	// /k/0049998, /k/0049999, /k/0049996, …; the same by groups a little
	// smaller than a node, each long enough a run to split at
	var pairs, groups []*slot
	for i := n - 2; i >= 0; i -= 2 {
		pairs = append(pairs, seq[i], seq[i+1])
	}
	g := indexNodeItems * 5 / 6
	for i := n - g; i >= 0; i -= g {
		groups = append(groups, seq[i:i+g]...)
	}
	var noisy []*slot // ascending, one in ten a random key
	r := rand.New(rand.NewPCG(5, 6))
	for i, j := range r.Perm(n) {
		if r.IntN(10) == 0 {
			i = j
		}
		noisy = append(noisy, seq[i])
	}
	for _, tt := range []struct {
		name    string
		slots   []*slot
		atLeast float64
	}{
		{"ascending", seq, 0.95},
		{"descending", desc, 0.95},
		{"ascending under 8 prefixes at once", prefixes, 0.9},
		{"random", benchSlots(n, true), 0.65},
		{"ascending, one in ten random", noisy, 0.55},
		{"descending pairs", pairs, 0.45},
		{"descending groups of 5/6 a node", groups, 0.35},
	} {
		t.Run(tt.name, func(t *testing.T) {
			x := new(index)
			for _, sl := range tt.slots {
				x.insert(sl)
			}
			got, depth := fill(x)
			t.Logf("%.1f%% full, %d deep", 100*got, depth)
			if got < tt.atLeast || depth > 3 {
				t.Errorf("%.1f%% full, %d deep; want at least %.0f%%, at most 3 deep", 100*got, depth, 100*tt.atLeast)
			}
		})
	}
	t.Run("churn", func(t *testing.T) {
		x := new(index)
		for _, sl := range seq {
			x.insert(sl)
		}
		r := rand.New(rand.NewPCG(3, 4))
		for range 2 * n {
			x.remove(seq[r.IntN(n)])
			x.insert(seq[r.IntN(n)])
		}
		got, depth := fill(x)
		t.Logf("%.1f%% full, %d deep", 100*got, depth)
		if got < 0.5 || depth > 3 {
			t.Errorf("%.1f%% full, %d deep after churn; want at least 50%%, at most 3 deep", 100*got, depth)
		}
	})
}

// TestIndexAllocations: a read allocates nothing beyond dst, and an
// insert that splits no node allocates nothing.
func TestIndexAllocations(t *testing.T) {
	x := new(index)
	slots := benchSlots(10_000, true)
	for _, sl := range slots {
		x.insert(sl)
	}
	dst, from := make([]*slot, 0, 100), benchKey(5000)
	if got := testing.AllocsPerRun(100, func() { dst = x.read(dst[:0], from, "", 100) }); got != 0 {
		t.Errorf("read: %v allocations; want 0", got)
	}
	sl := slots[5000]
	if got := testing.AllocsPerRun(100, func() { x.remove(sl); x.insert(sl) }); got != 0 {
		t.Errorf("remove and insert: %v allocations; want 0", got)
	}
}

// TestIndexNodeSizes: a leaf of each size the benchmarks compare takes
// the size class it is made for, nothing rounded away.
func TestIndexNodeSizes(t *testing.T) {
	for _, tt := range []struct{ size, bytes int }{{57, 512}, {120, 1024}, {248, 2048}, {504, 4096}} {
		const n = 1000
		nodes := make([]*indexNode, n)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for i := range nodes {
			nodes[i] = newIndexNode(tt.size, true)
		}
		runtime.ReadMemStats(&after)
		if got := (after.TotalAlloc - before.TotalAlloc) / n; got != uint64(tt.bytes) {
			t.Errorf("leaf of %d items: %d bytes; want %d", tt.size, got, tt.bytes)
		}
		if nd := nodes[0]; cap(nd.items) != tt.size || len(nd.items) != 0 {
			t.Errorf("newIndexNode(%d): len %d, cap %d", tt.size, len(nd.items), cap(nd.items))
		}
	}
}
