// The HTTP API: the server type, the key handlers and the error helper.
// Its routes (routes is the one place every route is listed) and CORS
// are in routes.go.

package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// clientJS is the browser client, served at GET /.
//
//go:embed client.js
var clientJS []byte

// server answers the HTTP API for one store.
type server struct {
	cfg     config
	log     *slog.Logger
	store   *Store
	streams *streams // event streams and WebSockets
	writers *eventWriters
	access  *access      // nil: no -tokens, everything open
	cluster *etcdJournal // nil: not a node of a cluster (-etcd)
	metrics metrics
	health  atomic.Int32 // healthLoading, healthServing or healthStopping

	clientETag string
	origins    map[string]bool // nil: any origin

	mux     *http.ServeMux
	routing map[string][]*route // by pattern, in the order they are tried
	methods map[api]methodHeaders
	tracer  func(stage string, rt *route, target string)
}

func newServer(cfg config, log *slog.Logger) (*server, error) {
	access, err := newAccess(cfg)
	if err != nil {
		return nil, err
	}
	origins, err := parseOrigins(cfg.origins)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(clientJS)
	s := &server{
		cfg:        cfg,
		log:        log,
		store:      NewStore(cfg.maxKeys, nil),
		access:     access,
		origins:    origins,
		streams:    &streams{max: cfg.maxSubs, closing: make(chan struct{})},
		clientETag: `"` + hex.EncodeToString(sum[:8]) + `"`,
	}
	s.writers = newWriters(&s.store.published, cfg.writeTimeout, cfg.heartbeat, &s.metrics, s.streams)
	s.store.defaultTTL = time.Duration(cfg.defaultTTL)
	s.store.keepHistory(cfg.history)
	return s, nil
}

// close ends what http.Server.Shutdown does not: the event streams and
// WebSockets, whose connections were hijacked. It returns when they have.
func (s *server) close() {
	s.streams.close()
	s.writers.stopWriters()
}

// Header values shared by every response. Assigning these slices to the
// header map directly, rather than through Header.Set, saves an allocation
// per header per request; net/http never modifies them.
var (
	hdrAnyOrigin     = []string{"*"}
	hdrExposed       = []string{"X-Revision, X-TTL, X-Seq, Link"}
	hdrVaryOrigin    = []string{"Origin"}
	hdrJSON          = []string{"application/json"}
	hdrAllowHeaders  = []string{"Authorization, Content-Type, X-Revision, X-TTL, Last-Event-ID"}
	hdrPreflightLife = []string{"86400"}
)

// handlePreflight answers a CORS preflight request, with the methods of
// the shape that owns the path.
func (s *server) handlePreflight(w http.ResponseWriter, r *http.Request, _ string) outcome {
	m := s.methods[s.shapeOf(r)]
	h := w.Header()
	h["Access-Control-Allow-Methods"] = m.cors
	h["Access-Control-Allow-Headers"] = hdrAllowHeaders
	h["Access-Control-Max-Age"] = hdrPreflightLife
	h["Allow"] = m.allow
	w.WriteHeader(http.StatusNoContent)
	return outcomeOK
}

// handleMethodNotAllowed answers a method that no route of the path has,
// with the Allow of the shape that owns the path.
func (s *server) handleMethodNotAllowed(w http.ResponseWriter, r *http.Request, _ string) outcome {
	a := s.shapeOf(r)
	w.Header()["Allow"] = s.methods[a].allow
	msg := fmt.Sprintf("method %s not allowed", r.Method)
	if a == apiREST {
		msg += " under -kvserver-rest " + s.cfg.kvserverREST
	}
	serveError(w, http.StatusMethodNotAllowed, msg)
	return outcomeBadRequest
}

// serveUpgrade answers GET / with Upgrade: websocket.
func (s *server) serveUpgrade(w http.ResponseWriter, r *http.Request, _ string) outcome {
	s.handleWebSocket(w, r)
	return outcomeOK
}

// serveEvents answers GET of a path with Accept: text/event-stream.
func (s *server) serveEvents(w http.ResponseWriter, r *http.Request, path string) outcome {
	s.handleEvents(w, r, path)
	return outcomeOK
}

// serveListing answers GET / with Accept: application/json: every key.
func (s *server) serveListing(w http.ResponseWriter, r *http.Request, path string) outcome {
	return s.serveList(w, r, path)
}

// handleClient answers GET /: the JavaScript client.
func (s *server) handleClient(w http.ResponseWriter, r *http.Request, _ string) outcome {
	h := w.Header()
	h.Set("ETag", s.clientETag)
	h.Set("Cache-Control", "no-cache")
	if inm := r.Header.Get("If-None-Match"); inm != "" && strings.Contains(inm, s.clientETag) {
		w.WriteHeader(http.StatusNotModified)
		return outcomeOK
	}
	h.Set("Content-Type", "text/javascript; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(clientJS)))
	w.Write(clientJS)
	return outcomeOK
}

// handleGet answers GET of a key (its value) or of a prefix ending with
// "/" (the listing of the keys under it).
func (s *server) handleGet(w http.ResponseWriter, r *http.Request, key string) outcome {
	if strings.HasSuffix(key, "/") {
		if err := checkPath(key, s.cfg.maxKeyBytes); err != nil {
			return s.serveFailure(w, apiNative, err)
		}
		return s.serveList(w, r, key)
	}
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	if err := s.store.journal.current(r.Context()); err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	// Every change up to seq is applied before the key is read.
	seq := s.store.published.Load()
	e := s.store.Get(key)
	w.Header()["X-Seq"] = []string{strconv.FormatInt(seq, 10)}
	if e == nil {
		w.Header()["X-Revision"] = hdrNoRevision
		serveError(w, http.StatusNotFound, "no such key")
		return outcomeOK
	}
	s.serveEntry(w, http.StatusOK, e)
	return outcomeOK
}

var hdrNoRevision = []string{"-1"}

// serveEntry answers with a version of a key: its value as the body, its
// revision in X-Revision and the milliseconds it has left in X-TTL. A nil
// e answers null and revision -1.
func (s *server) serveEntry(w http.ResponseWriter, code int, e *entry) {
	h := w.Header()
	h["Content-Type"] = hdrJSON
	if e == nil {
		h["X-Revision"] = hdrNoRevision
		w.WriteHeader(code)
		io.WriteString(w, "null")
		return
	}
	h["X-Revision"] = []string{strconv.FormatInt(e.revision, 10)}
	if ms, ok := e.ttlLeft(s.store.now()); ok {
		h["X-Ttl"] = []string{strconv.FormatInt(ms, 10)}
	}
	w.WriteHeader(code)
	io.WriteString(w, e.value)
}

// maxPage is the most items a page of a listing may ask for (?limit).
const maxPage = 10_000

// listQuery is what a listing asks besides its prefix (SPEC 3a): at most
// limit items (0: every one), after a key (or with shallow a prefix
// item's prefix), the direct children only.
type listQuery struct {
	limit   int
	after   string
	shallow bool
}

// parseListQuery reads a listing's ?limit, ?after and ?shallow, or the
// WebSocket list's limit, after and shallow; the error names the one
// that is bad.
func parseListQuery(limit *string, after string, shallow bool, maxKeyBytes int) (listQuery, error) {
	q := listQuery{after: after, shallow: shallow}
	if limit != nil {
		n, err := strconv.Atoi(*limit)
		if err != nil || n < 1 || n > maxPage {
			return q, fmt.Errorf("invalid limit %q: want an integer from 1 to %d", *limit, maxPage)
		}
		q.limit = n
	}
	if after != "" {
		err := checkKey(after, maxKeyBytes)
		if shallow && strings.HasSuffix(after, "/") {
			err = checkPath(after, maxKeyBytes)
		}
		if err != nil {
			return q, fmt.Errorf("invalid after: %w", err)
		}
	}
	return q, nil
}

// listQueryOf reads the listing query of r; a query that names none of
// its parameters is a whole listing.
func (s *server) listQueryOf(r *http.Request) (listQuery, error) {
	if r.URL.RawQuery == "" {
		return listQuery{}, nil
	}
	v := r.URL.Query()
	var limit *string
	if l, ok := v["limit"]; ok {
		limit = &l[0]
	}
	_, shallow := v["shallow"]
	return parseListQuery(limit, v.Get("after"), shallow, s.cfg.maxKeyBytes)
}

// serveList answers the listing of the keys under prefix, in key order
// (SPEC 3a), as of one point of the change sequence, which X-Seq gives.
// A whole listing is written as it is read, a chunk at a time, so that
// its memory is bounded whatever the prefix holds. A page (?limit) is
// read whole first, and one item more, to know whether a Link to the
// next page goes in the head; it is at most 10,000 items, held as
// references to the stored values.
func (s *server) serveList(w http.ResponseWriter, r *http.Request, prefix string) outcome {
	q, err := s.listQueryOf(r)
	if err == nil {
		err = s.store.journal.current(r.Context())
	}
	if err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	l := s.store.list(prefix, q.after, q.shallow)
	defer l.close()
	h := w.Header()
	h["Content-Type"] = hdrJSON
	h["X-Seq"] = []string{strconv.FormatInt(l.seq(), 10)}
	if q.limit > 0 {
		page, err := l.next(nil, q.limit+1, 0)
		if err != nil {
			return s.serveFailure(w, apiNative, err)
		}
		if len(page) > q.limit {
			page = page[:q.limit]
			h["Link"] = []string{nextLink(r, q, page[len(page)-1].key)}
		}
		// The page holds references to the stored values; it is written
		// as a whole listing is, a chunk of about chunkBytes at a time.
		err = s.writeList(w, func() ([]item, error) {
			n, weight := 0, 0
			for n < len(page) && (n == 0 || weight < chunkBytes) {
				weight += len(page[n].key)
				if page[n].entry != nil {
					weight += len(page[n].value)
				}
				n++
			}
			chunk := page[:n]
			page = page[n:]
			return chunk, nil
		})
		if err != nil {
			panic(http.ErrAbortHandler) // the client left, or took nothing for -write-timeout
		}
		return outcomeOK
	}
	var chunk [stateChunk]item
	if err := s.writeList(w, func() ([]item, error) { return l.next(chunk[:0], stateChunk, chunkBytes) }); err != nil {
		// The head is out: all that is left is to cut the answer short,
		// which no client takes for a whole one (or the client left).
		panic(http.ErrAbortHandler)
	}
	return outcomeOK
}

// writeList writes a JSON array of listing items, a chunk at a time as
// next gives them, until it gives none or fails. A client that takes no
// chunk for -write-timeout, or leaves, ends it: the rest is neither read
// nor encoded.
func (s *server) writeList(w http.ResponseWriter, next func() ([]item, error)) error {
	buf := getBuffer()
	defer putBuffer(buf)
	rc := http.NewResponseController(w)
	write := func(b []byte) error {
		rc.SetWriteDeadline(time.Now().Add(s.cfg.writeTimeout))
		_, err := w.Write(b)
		return err
	}
	b := append(buf.AvailableBuffer(), '[')
	for n := 0; ; n++ {
		items, err := next()
		if err != nil {
			return err
		}
		if len(items) == 0 {
			break
		}
		if n > 0 {
			b = append(b, ',')
		}
		b = appendItems(b, items, false, s.store.now())
		if err := write(b); err != nil {
			return err
		}
		b = b[:0]
	}
	return write(append(b, ']'))
}

// nextLink is the Link header of a page whose last item is last: the
// URL of the next page (RFC 8288).
func nextLink(r *http.Request, q listQuery, last string) string {
	u := r.URL.EscapedPath() + "?"
	if q.shallow {
		u += "shallow&"
	}
	return "<" + u + "limit=" + strconv.Itoa(q.limit) + "&after=" + url.QueryEscape(last) + `>; rel="next"`
}

// appendItems appends listing items, separated by commas: each
// {"key","value","revision"[,"ttl"]}, or a shallow listing's {"prefix"};
// keys spelled KvServer's way if kvserver. now is when they were read,
// for their TTLs.
func appendItems(b []byte, items []item, kvserver bool, now int64) []byte {
	for i, it := range items {
		if i > 0 {
			b = append(b, ',')
		}
		if it.entry == nil {
			b = append(b, `{"prefix":`...)
			b = appendKey(b, spell(it.key, kvserver))
			b = append(b, '}')
			continue
		}
		b = appendItem(b, item{spell(it.key, kvserver), it.entry}, now)
	}
	return b
}

// appendItem appends the JSON object of a key's version, as a listing, a
// WebSocket get and a conflict send it: {"key","value","revision"[,"ttl"]},
// ttl the milliseconds it has left at now. A nil entry is the key
// missing: value null, revision -1.
func appendItem(b []byte, it item, now int64) []byte {
	b = appendVersion(append(b, '{'), it.key, it.entry)
	if it.entry != nil {
		if ms, ok := it.ttlLeft(now); ok {
			b = append(b, `,"ttl":`...)
			b = strconv.AppendInt(b, ms, 10)
		}
	}
	return append(b, '}')
}

// appendVersion appends the members "key","value","revision" of key at
// version e (null and -1 if e is nil: missing): what every JSON object of
// a key's version holds, an item and a WebSocket value event alike. The
// value is the stored bytes, compact JSON, appended as they are.
func appendVersion(b []byte, key string, e *entry) []byte {
	b = append(b, `"key":`...)
	b = appendKey(b, key)
	b = append(b, `,"value":`...)
	if e == nil {
		return strconv.AppendInt(append(b, `null,"revision":`...), noRevision, 10)
	}
	b = append(b, e.value...)
	b = append(b, `,"revision":`...)
	return strconv.AppendInt(b, e.revision, 10)
}

// handleSet answers POST: set a key unconditionally.
func (s *server) handleSet(w http.ResponseWriter, r *http.Request, key string) outcome {
	value, ttl, err := s.readWrite(w, r, key)
	if err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	e, err := s.store.Set(key, value, ttl)
	return s.serveWritten(w, e, err)
}

// handleUpdate answers PUT: compare-and-swap a key. X-Revision is the
// revision the write will have.
func (s *server) handleUpdate(w http.ResponseWriter, r *http.Request, key string) outcome {
	rev, err := revisionHeader(r, true)
	if err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	value, ttl, err := s.readWrite(w, r, key)
	if err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	e, err := s.store.CompareAndSwap(key, value, rev, ttl)
	return s.serveWritten(w, e, err)
}

// handleDelete answers DELETE: remove a key, if X-Revision is given only
// at that revision.
func (s *server) handleDelete(w http.ResponseWriter, r *http.Request, key string) outcome {
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	rev, err := revisionHeader(r, false)
	if err != nil {
		return s.serveFailure(w, apiNative, err)
	}
	existed, err := s.store.Delete(key, rev)
	if err != nil {
		return s.serveWritten(w, nil, err)
	}
	w.Header()["Content-Type"] = hdrJSON
	fmt.Fprintf(w, `{"deleted":%t}`, existed)
	return outcomeOK
}

// revisionHeader parses X-Revision. Without the header it returns -1, or
// an error if required.
func revisionHeader(r *http.Request, required bool) (int64, error) {
	h := r.Header.Get("X-Revision")
	if h == "" {
		if required {
			return 0, errors.New("missing X-Revision header: the revision the write will have (0 to create)")
		}
		return -1, nil
	}
	rev, err := strconv.ParseInt(h, 10, 64)
	if err != nil || rev < 0 {
		return 0, fmt.Errorf("invalid X-Revision %q: want a revision number >= 0", h)
	}
	return rev, nil
}

// readWrite checks the key and TTL of a write and reads its value.
func (s *server) readWrite(w http.ResponseWriter, r *http.Request, key string) (value string, ttl time.Duration, err error) {
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return "", 0, err
	}
	// X-TTL wins over ?ttl=. The query is looked at only when the raw
	// query is not empty, so a plain write parses nothing.
	t := r.Header.Get("X-TTL")
	if t == "" && r.URL.RawQuery != "" {
		t = r.URL.Query().Get("ttl")
	}
	if t != "" {
		if ttl, err = parseTTL(t); err != nil {
			return "", 0, err
		}
	}
	value, err = s.readValue(w, r)
	return value, ttl, err
}

// readLimit is the most bytes read for one write: a request body or a
// WebSocket message. The value's own limit is on its compacted form
// (checkValue), so what comes with it must fit as well: the whitespace of
// a value written by hand or pretty-printed, and an envelope around it
// (KvServer's {"value": …}, a WebSocket message with its key and id). But
// a body is held whole while it is read, so it is bounded too, or
// whitespace could make the server read without end. Twice the value
// limit is room for a document indented as JSON.stringify(v, null, 2)
// and json.MarshalIndent write it (objects of named fields come to about
// 1.6 times their compact size; only arrays of one-digit numbers, at 2.5,
// need sending compact near the limit); the key and 64 KiB are the
// envelope, and room for a small limit whatever the value's spacing.
func (s *server) readLimit() int64 {
	return 2*s.cfg.maxValueBytes + int64(s.cfg.maxKeyBytes) + 64<<10
}

// readValue reads a request body that must be one JSON value, and
// returns it compacted if that fits -max-value-bytes (checkValue). A
// body past readLimit is refused as it is read.
func (s *server) readValue(w http.ResponseWriter, r *http.Request) (string, error) {
	body := getBuffer()
	defer putBuffer(body)
	if err := readBody(w, r, body, s.readLimit()); err != nil {
		return "", err
	}
	return s.checkValue(body.Bytes())
}

// readBody reads a request body of at most max bytes into buf. Past the
// limit it returns a tooLargeError about the body.
func readBody(w http.ResponseWriter, r *http.Request, buf *bytes.Buffer, max int64) error {
	if r.ContentLength > max {
		return &tooLargeError{"body", max}
	}
	src := r.Body
	if r.ContentLength < 0 {
		// Chunked: only the reader can enforce the limit. With a known
		// length net/http already stops the body there.
		src = http.MaxBytesReader(w, r.Body, max)
	}
	if _, err := buf.ReadFrom(src); err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return &tooLargeError{"body", max}
		}
		return fmt.Errorf("reading the body: %v", err)
	}
	return nil
}

// checkValue checks that raw is one JSON value and returns it compacted,
// if that fits -max-value-bytes. It is the one size rule of every write
// (HTTP POST and PUT, the WebSocket, KvServer's REST shape), and it
// weighs the compacted form, which is what the store keeps and sends: a
// value is accepted or refused alike whatever whitespace it came with,
// and over whichever interface.
func (s *server) checkValue(raw []byte) (string, error) {
	return compactValue(raw, s.cfg.maxValueBytes)
}

// compactValue checks that src is one JSON value and returns it
// compacted, or a tooLargeError if that is over max bytes. json.Compact
// validates as it goes, so the value is scanned once; it is never
// decoded, which keeps numbers and member order exactly as written.
func compactValue(src []byte, max int64) (string, error) {
	out := getBuffer()
	defer putBuffer(out)
	if err := json.Compact(out, src); err != nil {
		return "", fmt.Errorf("invalid JSON value: %v", err)
	}
	if int64(out.Len()) > max {
		return "", &tooLargeError{"value", max}
	}
	return out.String(), nil
}

// valueAndTTL checks the value and TTL of a write that came inside a
// JSON envelope (a WebSocket message, KvServer's REST body): the value
// must be there (null is a value) and pass checkValue; the TTL may be
// absent or null.
func (s *server) valueAndTTL(rawValue, rawTTL json.RawMessage) (string, time.Duration, error) {
	if rawValue == nil {
		return "", 0, errors.New(`missing "value" (null is a value: send "value": null)`)
	}
	value, err := s.checkValue(rawValue)
	if err != nil {
		return "", 0, err
	}
	var ttl time.Duration
	if rawTTL != nil && string(rawTTL) != "null" {
		if ttl, err = ttlFromJSON(rawTTL); err != nil {
			return "", 0, err
		}
	}
	return value, ttl, nil
}

// serveWritten answers a write of the native API: the new revision; or a
// conflict, with the current state; or the failure.
func (s *server) serveWritten(w http.ResponseWriter, e *entry, err error) outcome {
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		s.serveEntry(w, http.StatusConflict, conflict.cur())
		return outcomeConflict
	case err != nil:
		return s.serveFailure(w, apiNative, err)
	}
	rev := strconv.FormatInt(e.revision, 10)
	h := w.Header()
	h["Content-Type"] = hdrJSON
	h["X-Revision"] = []string{rev}
	io.WriteString(w, `{"revision":`)
	io.WriteString(w, rev)
	io.WriteString(w, `}`)
	return outcomeOK
}

// serveError answers an error: status code and {"error": msg}.
func serveError(w http.ResponseWriter, code int, msg string) {
	body, _ := json.Marshal(struct {
		Error string `json:"error"`
	}{msg})
	h := w.Header()
	h["Content-Type"] = hdrJSON
	h.Del("Content-Length")
	w.WriteHeader(code)
	w.Write(body)
}

// accepts reports whether the Accept header of r lists the media type.
func accepts(r *http.Request, mediaType string) bool {
	for _, v := range r.Header.Values("Accept") {
		for part := range strings.SplitSeq(v, ",") {
			if mt, _, _ := strings.Cut(part, ";"); strings.EqualFold(strings.TrimSpace(mt), mediaType) {
				return true
			}
		}
	}
	return false
}

// Request bodies and encoded answers reuse buffers.
var buffers = sync.Pool{New: func() any { return new(bytes.Buffer) }}

func getBuffer() *bytes.Buffer { return buffers.Get().(*bytes.Buffer) }

func putBuffer(b *bytes.Buffer) {
	if b.Cap() > 64<<10 {
		return // let the GC have large ones rather than pin them
	}
	b.Reset()
	buffers.Put(b)
}

// logRequests logs one line per request.
func logRequests(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(rec, r)
		args := []any{"method", r.Method, "path", r.URL.Path}
		if r.URL.RawQuery != "" {
			// Tokens never reach the log: not the Authorization header,
			// and not ?token=, elided from the query.
			args = append(args, "query", redactQuery(r.URL.RawQuery))
		}
		log.Info("request", append(args, "status", rec.code, "duration", time.Since(start))...)
	})
}

// statusRecorder remembers the status code of a response. Unwrap lets
// http.ResponseController reach the connection beneath it.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.code = code
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// Hijack passes the connection on: x/net/websocket asserts http.Hijacker
// rather than using http.ResponseController.
func (r *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	r.code = http.StatusSwitchingProtocols
	return http.NewResponseController(r.ResponseWriter).Hijack()
}
