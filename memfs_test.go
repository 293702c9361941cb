package main

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"path"
	"slices"
	"sort"
	"sync"
)

// memFS, the file system the crash-state tests (crash_test.go) and the
// fail-stop tests (data_test.go) run the data files on: in memory, and
// recording every operation, so that the directory a crash could leave
// after any of them can be rebuilt (apply), and an operation failed on
// purpose (fault).

// opKind is a file-system operation as memFS records it.
type opKind uint8

const (
	opCreate   opKind = iota // name, ino: a new file
	opWrite                  // ino, data: appended
	opTruncate               // ino, size
	opSync                   // ino: fsync of a file
	opRename                 // name, to
	opRemove                 // name
	opSyncDir                // fsync of the directory
	opAck                    // not a file operation: the test marks that seq was acknowledged
)

type fsOp struct {
	kind     opKind
	ino      int
	name, to string
	data     []byte
	size     int64
	seq      int64
	value    string // opAck: the value written, when seq is not known yet
}

func (op fsOp) String() string {
	switch op.kind {
	case opCreate:
		return fmt.Sprintf("create %s (#%d)", path.Base(op.name), op.ino)
	case opWrite:
		return fmt.Sprintf("write #%d %d bytes", op.ino, len(op.data))
	case opTruncate:
		return fmt.Sprintf("truncate #%d to %d", op.ino, op.size)
	case opSync:
		return fmt.Sprintf("fsync #%d", op.ino)
	case opRename:
		return fmt.Sprintf("rename %s %s", path.Base(op.name), path.Base(op.to))
	case opRemove:
		return fmt.Sprintf("remove %s", path.Base(op.name))
	case opSyncDir:
		return "fsync dir"
	}
	return fmt.Sprintf("ack %d", op.seq)
}

// errInjected is the error memFS gives an operation a test chose to fail.
var errInjected = errors.New("injected I/O error")

// memFS is a file system in memory, one directory deep, that records every
// operation. Its files are inodes, so a rename or remove of an open file
// behaves as on disk. fault, if set, may fail an operation before it is
// done (it is then not recorded).
type memFS struct {
	mu    sync.Mutex
	names map[string]int // path -> inode
	inos  map[int][]byte // inode -> contents
	next  int
	ops   []fsOp
	fault func(op fsOp) error
}

func newMemFS() *memFS { return &memFS{names: map[string]int{}, inos: map[int][]byte{}, next: 1} }

// do records op and applies it, unless fault fails it.
func (m *memFS) do(op fsOp) error {
	if m.fault != nil && op.kind != opAck {
		if err := m.fault(op); err != nil {
			return err
		}
	}
	m.ops = append(m.ops, op)
	apply(m.names, m.inos, op, -1)
	return nil
}

// apply does op to a directory; keep >= 0 keeps only that many bytes of
// a write (a write torn by a power loss), keep < -1 writes zeroes.
func apply(names map[string]int, inos map[int][]byte, op fsOp, keep int) {
	switch op.kind {
	case opCreate:
		names[op.name] = op.ino
		inos[op.ino] = nil
	case opWrite:
		data := op.data
		switch {
		case keep >= 0:
			data = data[:keep]
		case keep < -1:
			data = make([]byte, len(data))
		}
		// Appending never changes the bytes an earlier image holds (a
		// truncation clips, so the next append copies).
		inos[op.ino] = append(inos[op.ino], data...)
	case opTruncate:
		b := inos[op.ino]
		if int64(len(b)) > op.size {
			inos[op.ino] = slices.Clip(b[:op.size])
		} else {
			inos[op.ino] = append(slices.Clip(b), make([]byte, op.size-int64(len(b)))...)
		}
	case opRename:
		names[op.to] = names[op.name]
		delete(names, op.name)
	case opRemove:
		delete(names, op.name)
	}
}

// ack marks, among the operations, that the change numbered seq was
// acknowledged.
func (m *memFS) ack(seq int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.do(fsOp{kind: opAck, seq: seq})
}

func (m *memFS) mkdirAll(string) error { return nil }

func (m *memFS) lock(string) (io.Closer, error) { return io.NopCloser(nil), nil }

func (m *memFS) create(p string) (dataFile, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ino, ok := m.names[p]; ok {
		if err := m.do(fsOp{kind: opTruncate, ino: ino}); err != nil {
			return nil, err
		}
		return &memFile{fs: m, ino: ino}, nil
	}
	ino := m.next
	if err := m.do(fsOp{kind: opCreate, name: p, ino: ino}); err != nil {
		return nil, err
	}
	m.next++
	return &memFile{fs: m, ino: ino}, nil
}

func (m *memFS) openAppend(p string) (dataFile, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino, ok := m.names[p]
	if !ok {
		return nil, &os.PathError{Op: "open", Path: p, Err: os.ErrNotExist}
	}
	return &memFile{fs: m, ino: ino}, nil
}

func (m *memFS) open(p string) (dataFile, int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino, ok := m.names[p]
	if !ok {
		return nil, 0, &os.PathError{Op: "open", Path: p, Err: os.ErrNotExist}
	}
	b := m.inos[ino]
	return &memFile{fs: m, ino: ino, r: bytes.NewReader(b)}, int64(len(b)), nil
}

func (m *memFS) readDir(dir string) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for p := range m.names {
		if path.Dir(p) == dir {
			names = append(names, path.Base(p))
		}
	}
	sort.Strings(names)
	return names, nil
}

func (m *memFS) size(p string) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino, ok := m.names[p]
	if !ok {
		return 0, os.ErrNotExist
	}
	return int64(len(m.inos[ino])), nil
}

func (m *memFS) rename(from, to string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.names[from]; !ok {
		return os.ErrNotExist
	}
	return m.do(fsOp{kind: opRename, name: from, to: to})
}

func (m *memFS) remove(p string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.names[p]; !ok {
		return os.ErrNotExist
	}
	return m.do(fsOp{kind: opRemove, name: p})
}

func (m *memFS) truncate(p string, size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ino, ok := m.names[p]
	if !ok {
		return os.ErrNotExist
	}
	return m.do(fsOp{kind: opTruncate, ino: ino, size: size})
}

func (m *memFS) syncDir(string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.do(fsOp{kind: opSyncDir})
}

// memFile is an open file of a memFS: appended to, or read from r.
type memFile struct {
	fs     *memFS
	ino    int
	r      *bytes.Reader
	closed bool
}

func (f *memFile) Read(p []byte) (int, error) { return f.r.Read(p) }

func (f *memFile) Write(p []byte) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return 0, os.ErrClosed
	}
	if err := f.fs.do(fsOp{kind: opWrite, ino: f.ino, data: slices.Clone(p)}); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *memFile) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return os.ErrClosed
	}
	return f.fs.do(fsOp{kind: opSync, ino: f.ino})
}

func (f *memFile) Close() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	f.closed = true
	return nil
}

// image is a directory a crash leaves: path -> contents.
type image map[string][]byte

// memFSOf returns a file system holding img, with no operations recorded.
func memFSOf(img image) *memFS {
	m := newMemFS()
	for p, b := range img {
		m.names[p] = m.next
		m.inos[m.next] = slices.Clone(b)
		m.next++
	}
	return m
}

func (img image) hash() uint64 {
	h := fnv.New64a()
	names := make([]string, 0, len(img))
	for p := range img {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		fmt.Fprintf(h, "%s\x00%d\x00", p, len(img[p]))
		h.Write(img[p])
	}
	return h.Sum64()
}
