// The record format of the data files (-data): how a record is framed,
// checked and read back, and how the changes and a snapshot's keys are
// encoded in record bodies. data.go decides what goes in which file;
// this file only knows bytes, as etcd's wal keeps its encoder and decoder
// apart from the log.
//
// Every record, in both kinds of file, is framed as etcd's WAL frames
// them, and its header has a check of its own:
//
//	uint32 n     length of the body (little-endian)
//	uint32 crc   CRC-32C of the body
//	uint32 hcrc  CRC-32C of n and crc
//	[n]byte      the body
//
// so that a record cut short at the end of the log (a crash mid-write)
// is told apart from damage (a check that fails before the end, or a
// length that was flipped), which stops the server with the file and
// the offset rather than lose data silently. Bodies hold varints:
//
//	'H' "atomkv" version kind first   a file's first record; kind 'L' (first: its first change)
//	                                  or 'S' (first: the last change it holds)
//	'S' seq revision deadline len key value   a write; deadline in Unix ns, 0 for none
//	'D' seq key                       a delete
//	'X' seq key                       an expiry
//	'T' seq count (op)...             a transaction's changes, one number; each op is
//	                                  'S' revision deadline len key len value, or 'D' len key
//	'B' (len key len value revision deadline)...   a block of a snapshot's keys
//	'E' count                         the end of a snapshot, which holds count keys

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

const (
	headerSize = 12
	maxRecord  = 256 << 20 // a larger length is damage, not data
	dataMagic  = "atomkv"
	dataFormat = 1
)

// appendRecord appends body, framed.
func appendRecord(b, body []byte) []byte {
	start := len(b)
	b = append(b, make([]byte, headerSize)...)
	b = append(b, body...)
	frame(b[start:])
	return b
}

// frame fills in the header of the record rec, whose body follows it.
func frame(rec []byte) {
	body := rec[headerSize:]
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(body)))
	binary.LittleEndian.PutUint32(rec[4:], crc32.Checksum(body, castagnoli))
	binary.LittleEndian.PutUint32(rec[8:], crc32.Checksum(rec[:8], castagnoli))
}

// appendHeader appends the body of a file's first record.
func appendHeader(b []byte, kind byte, first int64) []byte {
	b = append(b, 'H')
	b = append(b, dataMagic...)
	b = binary.AppendUvarint(b, dataFormat)
	b = append(b, kind)
	return binary.AppendUvarint(b, uint64(first))
}

// appendChange appends the record of a change to the log.
func appendChange(b []byte, c change) []byte {
	start := len(b)
	b = append(b, make([]byte, headerSize)...)
	switch {
	case c.e != nil:
		b = append(b, 'S')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = binary.AppendUvarint(b, uint64(c.e.revision))
		b = binary.AppendVarint(b, c.e.deadline())
		b = binary.AppendUvarint(b, uint64(len(c.key)))
		b = append(b, c.key...)
		b = append(b, c.e.value...)
	case c.why == expired:
		b = append(b, 'X')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = append(b, c.key...)
	default:
		b = append(b, 'D')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = append(b, c.key...)
	}
	frame(b[start:])
	return b
}

// appendChanges appends the record of changes that share a number: one
// change, or a transaction's.
func appendChanges(b []byte, changes []change) []byte {
	if len(changes) == 1 {
		return appendChange(b, changes[0])
	}
	start := len(b)
	b = append(b, make([]byte, headerSize)...)
	b = append(b, 'T')
	b = binary.AppendUvarint(b, uint64(changes[0].seq))
	b = binary.AppendUvarint(b, uint64(len(changes)))
	for _, c := range changes {
		if c.e != nil {
			b = append(b, 'S')
			b = binary.AppendUvarint(b, uint64(c.e.revision))
			b = binary.AppendVarint(b, c.e.deadline())
			b = binary.AppendUvarint(b, uint64(len(c.key)))
			b = append(b, c.key...)
			b = binary.AppendUvarint(b, uint64(len(c.e.value)))
			b = append(b, c.e.value...)
		} else {
			b = append(b, 'D')
			b = binary.AppendUvarint(b, uint64(len(c.key)))
			b = append(b, c.key...)
		}
	}
	frame(b[start:])
	return b
}

// decodeChanges reads a change record's body: the changes, one or a
// transaction's, with each one's deadline (Unix ns, 0: none).
func decodeChanges(body []byte) ([]change, []int64, error) {
	if body[0] != 'T' {
		c, expires, err := decodeChange(body)
		if err != nil {
			return nil, nil, err
		}
		return []change{c}, []int64{expires}, nil
	}
	r := byteReader{b: body[1:]}
	seq := int64(r.uvarint())
	n := r.uvarint()
	if r.err != nil || n < 2 || n > uint64(len(r.b)) {
		return nil, nil, errors.New("malformed transaction record")
	}
	changes := make([]change, n)
	expires := make([]int64, n)
	for i := range changes {
		c := &changes[i]
		c.seq = seq
		if len(r.b) == 0 {
			return nil, nil, errors.New("malformed transaction record")
		}
		kind := r.b[0]
		r.b = r.b[1:]
		switch kind {
		case 'S':
			c.e = &entry{revision: int64(r.uvarint())}
			expires[i] = r.varint()
			c.key = r.string(int(r.uvarint()))
			c.e.value = r.string(int(r.uvarint()))
		case 'D':
			c.key, c.why = r.string(int(r.uvarint())), deleted
		default:
			return nil, nil, fmt.Errorf("unknown op %q in a transaction record", kind)
		}
		if r.err != nil || c.key == "" {
			return nil, nil, errors.New("malformed transaction record")
		}
	}
	if len(r.b) != 0 {
		return nil, nil, errors.New("malformed transaction record: bytes after its last op")
	}
	return changes, expires, nil
}

// deadline returns when e expires, in Unix ns, or 0.
func (e *entry) deadline() int64 {
	if e.ttl == nil {
		return 0
	}
	return e.ttl.at
}

// decodeChange reads a change record's body.
func decodeChange(body []byte) (c change, expires int64, err error) {
	r := byteReader{b: body[1:]}
	c.seq = int64(r.uvarint())
	switch body[0] {
	case 'S':
		c.e = &entry{revision: int64(r.uvarint())}
		expires = r.varint()
		c.key = r.string(int(r.uvarint()))
		c.e.value = string(r.b)
	case 'D', 'X':
		c.key, c.why = string(r.b), deleted
		if body[0] == 'X' {
			c.why = expired
		}
	default:
		return c, 0, fmt.Errorf("unknown record %q", body[0])
	}
	if r.err != nil || c.key == "" {
		return c, 0, errors.New("malformed change record")
	}
	return c, expires, nil
}

// appendSnapshotKey appends a key and its version to a snapshot block.
func appendSnapshotKey(b []byte, key string, e *entry) []byte {
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = append(b, key...)
	b = binary.AppendUvarint(b, uint64(len(e.value)))
	b = append(b, e.value...)
	b = binary.AppendUvarint(b, uint64(e.revision))
	return binary.AppendVarint(b, e.deadline())
}

// decodeSnapshotKey reads a key and its version from a snapshot block,
// and returns the rest of the block.
func decodeSnapshotKey(b []byte) (key string, e *entry, expires int64, rest []byte, err error) {
	r := byteReader{b: b}
	key = r.string(int(r.uvarint()))
	e = &entry{value: r.string(int(r.uvarint()))}
	e.revision = int64(r.uvarint())
	expires = r.varint()
	if r.err != nil || key == "" {
		return "", nil, 0, nil, errors.New("malformed snapshot block")
	}
	return key, e, expires, r.b, nil
}

// byteReader reads varints and strings from a record body, keeping the
// first error.
type byteReader struct {
	b   []byte
	err error
}

func (r *byteReader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = io.ErrUnexpectedEOF
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *byteReader) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = io.ErrUnexpectedEOF
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *byteReader) string(n int) string {
	if n < 0 || n > len(r.b) {
		r.err = io.ErrUnexpectedEOF
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

// errTorn is the end of a file inside a record, as a crash mid-write
// leaves it.
var errTorn = errors.New("the file ends inside a record")

// recordReader reads the records of a file. Every error it returns,
// torn or damaged, names the file and the offset of the record.
type recordReader struct {
	path string
	r    *bufio.Reader
	off  int64 // of the next record
	at   int64 // of the record next read last: what damage names
	size int64
	body []byte
}

// newRecordReader reads the records of the size bytes r holds; path
// names them in errors.
func newRecordReader(path string, r io.Reader, size int64) *recordReader {
	return &recordReader{path: path, r: bufio.NewReaderSize(r, 256<<10), size: size}
}

// damaged is the error of damage at the current record.
func (rr *recordReader) damaged(what string) error {
	return fmt.Errorf("%s: damaged at offset %d: %s", rr.path, rr.at, what)
}

// tornError is a file that ends inside a record: a torn tail where a
// crash can leave one (the end of the newest log), damage anywhere else.
type tornError struct {
	path string
	off  int64
	what string
}

func (e *tornError) Error() string {
	return fmt.Sprintf("%s: at offset %d: %v: %s", e.path, e.off, errTorn, e.what)
}

func (e *tornError) Unwrap() error { return errTorn }

// asDamage returns err, if it is a torn tail, as the damage it is where
// no crash leaves one.
func asDamage(err error) error {
	var torn *tornError
	if errors.As(err, &torn) {
		return fmt.Errorf("%s: damaged at offset %d: %v: %s", torn.path, torn.off, errTorn, torn.what)
	}
	return err
}

// torn is the error of a file that ends inside its current record.
func (rr *recordReader) torn(format string, args ...any) error {
	return &tornError{rr.path, rr.off, fmt.Sprintf(format, args...)}
}

// next returns the next record's body, valid until the next call; io.EOF
// at the end of the file; an error wrapping errTorn if the file ends
// inside a record; or damage.
func (rr *recordReader) next() ([]byte, error) {
	rr.at = rr.off
	left := rr.size - rr.off
	switch {
	case left == 0:
		return nil, io.EOF
	case left < headerSize:
		if rr.zeroToEnd() {
			return nil, rr.torn("%d bytes of a header, zeroes", left)
		}
		return nil, rr.torn("%d bytes of a header", left)
	}
	var h [headerSize]byte
	if _, err := io.ReadFull(rr.r, h[:]); err != nil {
		return nil, fmt.Errorf("reading %s at offset %d: %w", rr.path, rr.off, err)
	}
	n := int64(binary.LittleEndian.Uint32(h[0:]))
	if crc32.Checksum(h[:8], castagnoli) != binary.LittleEndian.Uint32(h[8:]) {
		if h[headerSize-1] == 0 && rr.zeroToEnd() {
			// A crash after the file grew and before its data landed
			// leaves zeroes, from the start of a block: anywhere in a
			// record, its header included.
			return nil, rr.torn("zeroes to the end")
		}
		return nil, rr.damaged("bad record header checksum")
	}
	switch {
	case n > maxRecord:
		return nil, rr.damaged(fmt.Sprintf("a record of %d bytes", n))
	case n > left-headerSize:
		return nil, rr.torn("%d of its %d bytes", left-headerSize, n)
	case n == 0:
		return nil, rr.damaged("an empty record")
	}
	rr.body = slices.Grow(rr.body[:0], int(n))[:n]
	if _, err := io.ReadFull(rr.r, rr.body); err != nil {
		return nil, fmt.Errorf("reading %s at offset %d: %w", rr.path, rr.off, err)
	}
	if crc32.Checksum(rr.body, castagnoli) != binary.LittleEndian.Uint32(h[4:]) {
		if n == left-headerSize || rr.body[n-1] == 0 && rr.zeroToEnd() {
			// The very last record, whole in length but not in
			// content, or zeroes from inside it to the end: a write the
			// crash cut, as far as anyone can tell.
			return nil, rr.torn("the last record's checksum fails")
		}
		return nil, rr.damaged("bad record checksum")
	}
	rr.off += headerSize + n
	return rr.body, nil
}

// zeroToEnd reports whether the rest of the file is zeroes.
func (rr *recordReader) zeroToEnd() bool {
	for {
		c, err := rr.r.ReadByte()
		if err == io.EOF {
			return true
		}
		if err != nil || c != 0 {
			return false
		}
	}
}

// errNoHeader is a file that ends before its first record is whole: as
// a crash between creating a log and writing its header leaves it.
var errNoHeader = errors.New("no header record")

// header checks a file's first record: its kind and number. A file
// that ends before the header is whole (empty, zeroes, cut short) is an
// error wrapping errNoHeader.
func (rr *recordReader) header(kind byte, first int64) error {
	body, err := rr.next()
	if err != nil {
		if err == io.EOF || errors.Is(err, errTorn) {
			return fmt.Errorf("%s: damaged at offset 0: %w (%d bytes)", rr.path, errNoHeader, rr.size)
		}
		return err
	}
	want := appendHeader(nil, kind, first)
	if !bytes.Equal(body, want) {
		return rr.damaged(fmt.Sprintf("header %q; want %q", body, want))
	}
	return nil
}
