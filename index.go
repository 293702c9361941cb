package main

import (
	"sort"
	"sync"
)

// index is a placeholder ordered index (a sorted slice) until the B-tree lands.
type index struct {
	mu    sync.RWMutex
	slots []*slot
}

func (x *index) find(key string) int {
	return sort.Search(len(x.slots), func(i int) bool { return x.slots[i].key >= key })
}

func (x *index) insert(sl *slot) {
	x.mu.Lock()
	defer x.mu.Unlock()
	i := x.find(sl.key)
	if i < len(x.slots) && x.slots[i].key == sl.key {
		x.slots[i] = sl
		return
	}
	x.slots = append(x.slots, nil)
	copy(x.slots[i+1:], x.slots[i:])
	x.slots[i] = sl
}

func (x *index) remove(sl *slot) {
	x.mu.Lock()
	defer x.mu.Unlock()
	i := x.find(sl.key)
	if i < len(x.slots) && x.slots[i] == sl {
		x.slots = append(x.slots[:i], x.slots[i+1:]...)
	}
}

func (x *index) read(dst []*slot, from, to string, max int) []*slot {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for i := x.find(from); i < len(x.slots) && len(dst) < max; i++ {
		if to != "" && x.slots[i].key >= to {
			break
		}
		dst = append(dst, x.slots[i])
	}
	return dst
}

func (x *index) len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.slots)
}

// prefixEnd returns the smallest string greater than every string with prefix p, or "" if none.
func prefixEnd(p string) string {
	b := []byte(p)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1])
		}
	}
	return ""
}
