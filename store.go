package main

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"unicode"
	"unicode/utf8"
)

// entry is one immutable version of a key. A write never changes an entry;
// it swaps in a new one, so a reader that loaded the pointer sees a value
// and revision that belong together without taking any lock.
type entry struct {
	value    string // compact JSON text
	revision int64
}

// slot holds the current version of one key. Writers to the key serialise
// on mu; readers only load cur.
//
// A slot whose key is deleted is removed from the map and its cur set to
// the tombstone. A writer that raced the delete and still holds the old
// slot sees the tombstone and starts again with a fresh slot, so no write
// can land in a slot that is no longer reachable. (A tombstone rather than
// a flag keeps the slot at 16 bytes: this is paid once per key.)
type slot struct {
	mu  sync.Mutex
	cur atomic.Pointer[entry] // nil or tombstone while the key is missing
}

var tombstone = &entry{revision: noRevision}

// load returns the current version, or nil if the key is missing.
func (sl *slot) load() *entry {
	if e := sl.cur.Load(); e != tombstone {
		return e
	}
	return nil
}

// Why a change happened; subscribers of the WebSocket API see it as the
// reason of a "no-value" event.
type reason uint8

const (
	changed reason = iota
	deleted
	expired
)

func (r reason) String() string {
	switch r {
	case deleted:
		return "deleted"
	case expired:
		return "expired"
	}
	return "changed"
}

// noRevision is the revision of a missing key, as GET and events report it.
const noRevision = -1

// Errors of the store. Handlers map them to status codes.
var (
	errConflict = errors.New("revision mismatch")
	errFull     = errors.New("store is full")
)

// conflictError carries the current state of a key whose compare-and-swap
// failed, so the caller can answer with it.
type conflictError struct{ cur *entry } // cur is nil if the key is missing

func (e *conflictError) Error() string { return errConflict.Error() }
func (e *conflictError) Unwrap() error { return errConflict }

// Store is the in-memory key-value store: keys, their current versions,
// and the hook through which every change is published.
type Store struct {
	keys    sync.Map     // key string -> *slot
	live    atomic.Int64 // keys that currently hold a value
	maxKeys int64        // 0: unlimited

	// publish is called for every change, with the key's slot locked, so
	// calls for one key happen in revision order. It must not block.
	publish func(key string, e *entry, why reason)
}

// NewStore returns an empty store that holds at most maxKeys keys (0: no
// limit).
func NewStore(maxKeys int64) *Store {
	return &Store{maxKeys: maxKeys, publish: func(string, *entry, reason) {}}
}

// Get returns the current version of key, or nil if it is missing.
func (s *Store) Get(key string) *entry {
	v, ok := s.keys.Load(key)
	if !ok {
		return nil
	}
	return v.(*slot).load()
}

// Set stores value under key unconditionally and returns the new version.
func (s *Store) Set(key, value string) (*entry, error) {
	return s.write(key, func(cur *entry) (*entry, error) {
		return &entry{value: value, revision: cur.next()}, nil
	})
}

// CompareAndSwap stores value under key only if the write would give it
// revision rev: the current revision is rev-1, or the key is missing and
// rev is 0. On a mismatch it returns a *conflictError holding the current
// version.
func (s *Store) CompareAndSwap(key, value string, rev int64) (*entry, error) {
	return s.write(key, func(cur *entry) (*entry, error) {
		if cur.next() != rev {
			return nil, &conflictError{cur}
		}
		return &entry{value: value, revision: rev}, nil
	})
}

// Delete removes key and reports whether it held a value. With rev >= 0
// it removes it only if its current revision is rev, and otherwise returns
// a *conflictError. Deleting a missing key without a revision is not an
// error.
func (s *Store) Delete(key string, rev int64) (existed bool, err error) {
	_, err = s.write(key, func(cur *entry) (*entry, error) {
		if rev >= 0 && (cur == nil || cur.revision != rev) {
			return nil, &conflictError{cur}
		}
		existed = cur != nil
		return nil, nil
	})
	return existed, err
}

// next is the revision the next write of a key at version e gets.
func (e *entry) next() int64 {
	if e == nil {
		return 0
	}
	return e.revision + 1
}

// write runs change on the current version of key with the key locked,
// installs what it returns (nil deletes the key) and publishes it.
func (s *Store) write(key string, change func(cur *entry) (*entry, error)) (*entry, error) {
	for {
		sl := s.slot(key)
		sl.mu.Lock()
		cur := sl.cur.Load()
		if cur == tombstone {
			sl.mu.Unlock()
			continue
		}
		next, err := change(cur)
		if err == nil && cur == nil && next != nil && !s.reserve() {
			err = errFull
		}
		if err == nil {
			s.install(key, sl, cur, next, deleted)
		}
		s.release(key, sl)
		sl.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return next, nil
	}
}

// install makes next the current version of the slot and publishes the
// change. why says what a nil next means. The slot must be locked.
func (s *Store) install(key string, sl *slot, cur, next *entry, why reason) {
	sl.cur.Store(next)
	switch {
	case next != nil:
		s.publish(key, next, changed)
	case cur != nil:
		s.live.Add(-1)
		s.publish(key, nil, why)
	}
}

// slot returns the slot of key, creating it if needed.
func (s *Store) slot(key string) *slot {
	if v, ok := s.keys.Load(key); ok {
		return v.(*slot)
	}
	v, _ := s.keys.LoadOrStore(key, new(slot))
	return v.(*slot)
}

// release removes an empty slot from the map. The slot must be locked.
func (s *Store) release(key string, sl *slot) {
	if sl.cur.Load() == nil {
		sl.cur.Store(tombstone)
		s.keys.CompareAndDelete(key, sl)
	}
}

// reserve counts one more live key, or reports false if the store is full.
func (s *Store) reserve() bool {
	if n := s.live.Add(1); s.maxKeys > 0 && n > s.maxKeys {
		s.live.Add(-1)
		return false
	}
	return true
}

// item is a key with its version, as listings return it.
type item struct {
	key string
	*entry
}

// List returns every key under prefix (which ends with "/"; "/" is every
// key) with its current version, sorted by key.
//
// Range is not a snapshot: a key written during the walk may appear with
// its old or new version, or not at all if it was created after the walk
// passed it. That is the same answer as a listing taken a moment earlier
// or later, which is all a listing promises.
func (s *Store) List(prefix string) []item {
	var items []item
	s.keys.Range(func(k, v any) bool {
		key := k.(string)
		if strings.HasPrefix(key, prefix) {
			if e := v.(*slot).load(); e != nil {
				items = append(items, item{key, e})
			}
		}
		return true
	})
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })
	return items
}

// Len returns the number of keys that hold a value.
func (s *Store) Len() int64 { return s.live.Load() }

// checkKey reports whether key is a valid key: it begins with "/", does not
// end with "/", and every component between slashes is one or more
// letters, digits, "-" or "_". maxBytes bounds its length.
func checkKey(key string, maxBytes int) error {
	if len(key) > maxBytes {
		return fmt.Errorf("invalid key %s: longer than %d bytes", quoteKey(key), maxBytes)
	}
	if len(key) < 2 || key[0] != '/' || key[len(key)-1] == '/' || !validComponents(key[1:]) {
		return fmt.Errorf("invalid key %s", quoteKey(key))
	}
	return nil
}

// checkPath reports whether path is something a subscription or listing
// can watch: a key, a prefix ending with "/", or "/" itself.
func checkPath(path string, maxBytes int) error {
	if path == "/" {
		return nil
	}
	if strings.HasSuffix(path, "/") {
		if len(path) > maxBytes || !validComponents(path[1:len(path)-1]) || path[0] != '/' {
			return fmt.Errorf("invalid path %s", quoteKey(path))
		}
		return nil
	}
	return checkKey(path, maxBytes)
}

// validComponents reports whether s is one or more non-empty components
// separated by single slashes.
func validComponents(s string) bool {
	if s == "" {
		return false
	}
	empty := true
	for _, r := range s {
		switch {
		case r == '/':
			if empty {
				return false
			}
			empty = true
			continue
		case r == '-' || r == '_' || r < utf8.RuneSelf && ('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'):
		case r >= utf8.RuneSelf && (unicode.IsLetter(r) || unicode.IsDigit(r)):
		default:
			return false // includes utf8.RuneError for invalid UTF-8
		}
		empty = false
	}
	return !empty
}

// quoteKey quotes a key for an error message, cutting a long one short.
func quoteKey(key string) string {
	const max = 64
	if len(key) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(key[cut]) {
			cut--
		}
		return fmt.Sprintf("%q… (%d bytes)", key[:cut], len(key))
	}
	return fmt.Sprintf("%q", key)
}
