package main

import (
	"slices"
	"sync"
)

// index is the store's keys in order: the set of its slots, sorted by key
// in byte order (Go's string order, which for UTF-8 is code-point order).
// The store's map finds a key; the index answers what comes from one on —
// listings and prefix states — in O(log n + k) for k keys of n. It changes
// only when a key is created or removed: values change inside the slot.
//
// It is a B-tree of slot pointers. A node holds nothing but pointers, 8
// bytes an item, and compares keys through them (a slot's key never
// changes), so the index costs about 8.3 bytes a key when its nodes are
// full, as put keeps them when keys come in order, and 12 when random
// inserts leave them 70% full.
//
// The zero index is empty and ready to use. It is safe for concurrent use:
// insert and remove take its write lock, read its read lock for one chunk,
// so readers wait not for each other but only for one insert or remove,
// and a writer waits for the chunks being read.
type index struct {
	mu    sync.RWMutex
	root  *indexNode // nil until the first insert; an empty leaf once emptied
	count int
}

// indexNode is a node of the B-tree. Its items are sorted by key; in an
// inner node, children[i] holds the keys between items[i-1] and items[i].
// Every leaf is at the same depth, and every node but the root holds at
// least one item, so the tree is at most log2(n)+1 deep (and in practice
// 3 deep for a million keys).
type indexNode struct {
	items    []*slot      // cap(items) is the node's size, fixed when it is made
	children []*indexNode // nil in a leaf, else len(items)+1 subtrees
	run      int32        // inserts in a row beside the one before: see put
	at       int32        // where the last insert went
}

// indexNodeItems is the size of the index's nodes: a leaf is 2,040
// bytes, its 56-byte header and its items in one allocation
// (newIndexNode), which with the 8-byte header Go's allocator puts before
// an object of pointers larger than 512 bytes fills its size class, 2,048
// bytes, exactly. Chosen by BenchmarkIndexInsert and
// BenchmarkIndexSideBySide against 512-byte, 1 KB and 4 KB nodes: a key
// costs less the larger the node, by less each time (9.3, 8.7, 8.3, 8.2
// bytes loaded in order; 13.2, 12.5, 12.0, 11.4 at random), and at a
// million keys 1, 2 and 4 KB nodes take as long within the noise (512
// bytes reads 1.1–1.2×). 4 KB would save 0.2–0.6 bytes a key more, for
// twice the bytes an insert moves and a split copies under the write
// lock. See docs/performance.md.
const indexNodeItems = 248

// newIndexNode returns an empty node of size items.
//
// A node of a size the benchmarks compare is one allocation: the header,
// then the items array its slice points into, so it fills one size class
// exactly, and a search reads the items beside the header. (Apart, the
// array would carry an allocator header of its own, which pushes 256
// items into the 2,304-byte class, and the node a 64-byte allocation.)
// Fixed-size arrays in the node would save 40 bytes of header, 5 items a
// node, but fix the size at compile time, and the benchmarks compare sizes
// in one run. Other sizes, the small nodes that tests use to make deep
// trees, allocate their array apart.
func newIndexNode(size int, leaf bool) *indexNode {
	var nd *indexNode
	switch size {
	case 57: // 512 B: no allocator header up to 512 bytes
		n := new(struct {
			indexNode
			a [57]*slot
		})
		nd, n.items = &n.indexNode, n.a[:0]
	case 120: // 1 KB
		n := new(struct {
			indexNode
			a [120]*slot
		})
		nd, n.items = &n.indexNode, n.a[:0]
	case 248: // 2 KB
		n := new(struct {
			indexNode
			a [248]*slot
		})
		nd, n.items = &n.indexNode, n.a[:0]
	case 504: // 4 KB
		n := new(struct {
			indexNode
			a [504]*slot
		})
		nd, n.items = &n.indexNode, n.a[:0]
	default:
		nd = &indexNode{items: make([]*slot, 0, size)}
	}
	if !leaf {
		nd.children = make([]*indexNode, 0, size+1)
	}
	return nd
}

// insert adds sl to the index. If the index holds a slot of sl's key, sl
// replaces it.
func (x *index) insert(sl *slot) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.root == nil {
		x.root = newIndexNode(indexNodeItems, true)
	}
	up, right, added := x.root.insert(sl)
	if right != nil {
		root := newIndexNode(cap(x.root.items), false)
		root.items = append(root.items, up)
		root.children = append(root.children, x.root, right)
		x.root = root
	}
	if added {
		x.count++
	}
}

// remove takes sl out of the index if it is the slot stored under its key.
// A slot of the same key that has replaced it stays.
func (x *index) remove(sl *slot) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.root == nil || !x.root.remove(sl) {
		return
	}
	x.count--
	if len(x.root.items) == 0 && x.root.children != nil {
		x.root = x.root.children[0]
	}
}

// read appends to dst, in key order, the slots whose keys k satisfy
// from <= k < to ("" as to: no upper bound), at most max of them (none if
// max <= 0), and returns dst. It holds the read lock only while it reads:
// O(log n + max).
func (x *index) read(dst []*slot, from, to string, max int) []*slot {
	if max <= 0 {
		return dst
	}
	x.mu.RLock()
	defer x.mu.RUnlock()
	if x.root != nil {
		dst, _ = x.root.ascend(dst, from, to, len(dst)+max)
	}
	return dst
}

// len returns the number of slots in the index.
func (x *index) len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.count
}

// prefixEnd returns the smallest string greater than every string that
// begins with p, the upper bound of a read of prefix p: "/a/" gives "/a0".
// It is "" (no bound) when there is none, for "" and for p made of 0xff
// bytes only.
func prefixEnd(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] != 0xff {
			return p[:i] + string([]byte{p[i] + 1})
		}
	}
	return ""
}

// search returns the position of key among nd's items: where it is, with
// found, or else where it would go.
//
// A key after the node's last item is found with one comparison, not a
// binary search's eight: keys that come in order (a snapshot loaded at
// start, a log of ascending keys, keys named by time or counter) go down
// the tree's right edge, comparing one key a node. It halves the restart
// of a million keys (BenchmarkDataRestart).
func (nd *indexNode) search(key string) (i int, found bool) {
	lo, hi := 0, len(nd.items)
	if hi > 0 && nd.items[hi-1].key < key {
		return hi, false
	}
	for lo < hi {
		h := int(uint(lo+hi) >> 1)
		if nd.items[h].key < key {
			lo = h + 1
		} else {
			hi = h
		}
	}
	return lo, lo < len(nd.items) && nd.items[lo].key == key
}

// insert adds sl to the subtree at nd, or replaces the item of its key,
// and reports whether it added one. If nd split, it returns the item that
// goes up to its parent and nd's new right sibling.
func (nd *indexNode) insert(sl *slot) (up *slot, right *indexNode, added bool) {
	i, found := nd.search(sl.key)
	switch {
	case found:
		nd.items[i] = sl
		return nil, nil, false
	case nd.children == nil:
		up, right = nd.put(i, sl, nil)
		return up, right, true
	}
	up, right, added = nd.children[i].insert(sl)
	if right != nil {
		up, right = nd.put(i, up, right)
	}
	return up, right, added
}

// put places item at position i of nd and, in an inner node, child after
// it (the right part of children[i], which has split). A full node splits
// first, and put returns the item that goes up and the new right sibling.
//
// A node splits in the middle, unless keys are arriving in order: a
// snapshot loading, /k/100000, /k/100001, … under other keys, or keys of
// reversed timestamps, newest first. Each then goes at the same place in
// the tree, just after the one before (ascending) or just before it
// (descending), and splits in the middle would leave a trail of
// half-empty nodes. So when the node's last half node of inserts or more
// were such a run and the item continues it, the node splits at the
// insertion point: the run's items stay together in a full node, the
// others move to their own, and the run goes on in a node with room, the
// item's, which fills in turn. An ascending or descending load leaves its
// nodes full; random inserts rarely make runs and leave nodes about 70%
// full. Requiring a run of half a node bounds what a pattern that defeats
// the rule can cost: a split at a run can leave the items on the far side
// of the insertion point in a nearly empty node, once per half node of
// inserts.
func (nd *indexNode) put(i int, item *slot, child *indexNode) (up *slot, right *indexNode) {
	n := len(nd.items)
	if n < cap(nd.items) {
		nd.insertAt(i, item, child)
		return nil, nil
	}
	run, step, s := int(nd.run), 0, n/2
	switch {
	case run >= n/2 && i > int(nd.at): // ascending
		step = 1
		switch {
		case i == n: // the right sibling starts with the item
			s = n - 1
		case i == n-1: // the item and the one after it start the right sibling
			s = n - 2
		default: // the item ends the node; the rest goes up and right
			s = i
		}
	case -run >= n/2 && i <= int(nd.at): // descending
		step = -1
		switch {
		case i <= 1: // the item ends the node (alone, or after one item)
			s = i
		default: // the item starts the right sibling; the rest stays
			s = i - 1
		}
	}
	up, right = nd.split(s)
	to, at := nd, i
	if i > s {
		to, at = right, i-s-1
	}
	to.insertAt(at, item, child)
	if step != 0 { // the run goes on where the item went
		to.run, to.at = int32(run+step), int32(at)
	}
	return up, right
}

// insertAt places item at position i of a node that has room for it and,
// in an inner node, child after it, and counts the node's run: a positive
// run is of inserts each after the one before (just after it, or past
// items that were there already), a negative one of inserts each before
// it. Random inserts make runs of about two.
func (nd *indexNode) insertAt(i int, item *slot, child *indexNode) {
	if i > int(nd.at) {
		nd.run = max(nd.run, 0) + 1
	} else {
		nd.run = min(nd.run, 0) - 1
	}
	nd.at = int32(i)
	nd.items = slices.Insert(nd.items, i, item)
	if child != nil {
		nd.children = slices.Insert(nd.children, i+1, child)
	}
}

// split moves the items after position s, and the children after them, to
// a new node, and returns items[s], which goes up to the parent between nd
// and the new node, and the new node. Neither node has a run then.
func (nd *indexNode) split(s int) (up *slot, right *indexNode) {
	right = newIndexNode(cap(nd.items), nd.children == nil)
	up = nd.items[s]
	right.items = append(right.items, nd.items[s+1:]...)
	clear(nd.items[s:])
	nd.items = nd.items[:s]
	if nd.children != nil {
		right.children = append(right.children, nd.children[s+1:]...)
		clear(nd.children[s+1:])
		nd.children = nd.children[:s+1]
	}
	nd.endRun()
	right.endRun()
	return up, right
}

// removeAt removes item i of a leaf. A run in the leaf goes on: the place
// of its last insert moves with the items.
func (nd *indexNode) removeAt(i int) {
	nd.items = slices.Delete(nd.items, i, i+1)
	if i <= int(nd.at) {
		nd.at--
	}
}

// endRun forgets nd's run, after a change that moves its items.
func (nd *indexNode) endRun() { nd.run, nd.at = 0, -2 }

// remove takes sl out of the subtree at nd if it is the item stored under
// its key, and reports whether it did.
func (nd *indexNode) remove(sl *slot) bool {
	i, found := nd.search(sl.key)
	switch {
	case found && nd.items[i] != sl:
		return false
	case nd.children == nil:
		if found {
			nd.removeAt(i)
		}
		return found
	case found:
		// Its predecessor, the last item of the subtree before it, takes
		// its place, so the item removed is always a leaf's.
		nd.items[i] = nd.children[i].removeLast()
	case !nd.children[i].remove(sl):
		return false
	}
	nd.refill(i)
	return true
}

// removeLast removes the last item of the subtree at nd and returns it.
func (nd *indexNode) removeLast() *slot {
	if nd.children == nil {
		last := nd.items[len(nd.items)-1]
		nd.removeAt(len(nd.items) - 1)
		return last
	}
	i := len(nd.children) - 1
	last := nd.children[i].removeLast()
	nd.refill(i)
	return last
}

// refill keeps child i of nd at least half full after a removal from it:
// if it is less, it merges with a sibling when both fit in one node, and
// else takes one item from the sibling (which keeps at least half). So
// removals never leave a node they pass through emptier than half, and
// nodes are freed as keys go: churn does not make the tree grow.
func (nd *indexNode) refill(i int) {
	if child := nd.children[i]; len(child.items) >= cap(child.items)/2 {
		return
	}
	if i == len(nd.items) {
		i-- // the last child's sibling is on its left
	}
	left, right := nd.children[i], nd.children[i+1]
	left.endRun()
	right.endRun()
	switch {
	case len(left.items)+1+len(right.items) <= cap(left.items):
		left.items = append(left.items, nd.items[i])
		left.items = append(left.items, right.items...)
		if left.children != nil {
			left.children = append(left.children, right.children...)
		}
		nd.items = slices.Delete(nd.items, i, i+1)
		nd.children = slices.Delete(nd.children, i+1, i+2)
	case len(left.items) > len(right.items):
		// The left's last item goes up, the parent's item down to the right.
		last := len(left.items) - 1
		right.items = slices.Insert(right.items, 0, nd.items[i])
		nd.items[i] = left.items[last]
		left.items = slices.Delete(left.items, last, last+1)
		if left.children != nil {
			right.children = slices.Insert(right.children, 0, left.children[last+1])
			left.children = slices.Delete(left.children, last+1, last+2)
		}
	default:
		// The right's first item goes up, the parent's item down to the left.
		left.items = append(left.items, nd.items[i])
		nd.items[i] = right.items[0]
		right.items = slices.Delete(right.items, 0, 1)
		if left.children != nil {
			left.children = append(left.children, right.children[0])
			right.children = slices.Delete(right.children, 0, 1)
		}
	}
}

// ascend appends to dst the items of the subtree at nd from key from on,
// in order, until one reaches to (if to is not "") or dst holds end items.
// It reports whether it stopped for either; if not, the next items, past
// the subtree, are wanted too. Only the first child it enters can hold
// keys before from; the others are searched from their start.
func (nd *indexNode) ascend(dst []*slot, from, to string, end int) (_ []*slot, stop bool) {
	i := 0
	if from != "" {
		i, _ = nd.search(from)
	}
	for ; ; i++ {
		if nd.children != nil {
			if dst, stop = nd.children[i].ascend(dst, from, to, end); stop {
				return dst, true
			}
			from = ""
		}
		if i == len(nd.items) {
			return dst, false
		}
		sl := nd.items[i]
		if to != "" && sl.key >= to {
			return dst, true
		}
		if dst = append(dst, sl); len(dst) == end {
			return dst, true
		}
	}
}
