// The HTTP API: the server type, its routes (routes is the one place
// every route is listed), the key handlers, CORS and the error helper.

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
	"path"
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
	access  *access // nil: no -tokens, everything open
	metrics metrics
	health  atomic.Int32 // healthLoading, healthServing or healthStopping

	clientETag string
	origins    map[string]bool // nil: any origin
}

func newServer(cfg config, log *slog.Logger) (*server, error) {
	access, err := newAccess(cfg)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(clientJS)
	s := &server{
		cfg:        cfg,
		log:        log,
		store:      NewStore(cfg.maxKeys, nil),
		access:     access,
		streams:    &streams{max: cfg.maxSubs, closing: make(chan struct{})},
		clientETag: `"` + hex.EncodeToString(sum[:8]) + `"`,
	}
	s.writers = newEventWriters(s)
	s.store.defaultTTL = time.Duration(cfg.defaultTTL)
	s.store.keepHistory(cfg.history)
	if cfg.origins != "*" {
		s.origins = make(map[string]bool)
		for _, o := range strings.Split(cfg.origins, ",") {
			s.origins[strings.TrimSpace(o)] = true
		}
	}
	return s, nil
}

// close ends what http.Server.Shutdown does not: the event streams and
// WebSockets, whose connections were hijacked. It returns when they have.
func (s *server) close() {
	s.streams.close()
	s.writers.stopWriters()
}

// routes returns the handler of every route; this is the one place they
// are listed.
func (s *server) routes() http.Handler {
	// The key is the whole path, so the patterns are subtrees ("GET /")
	// and handlers read r.URL.Path: a "{key...}" wildcard would cost the
	// router four allocations per request for a value we already have.
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.handleRoot)
	mux.HandleFunc("GET /", s.handleGet)
	mux.HandleFunc("POST /", s.handleSet)
	mux.HandleFunc("PUT /", s.handleUpdate)
	mux.HandleFunc("DELETE /", s.handleDelete)
	mux.HandleFunc("OPTIONS /", s.handlePreflight)
	if p := s.cfg.kvserverREST; p != "" {
		mux.HandleFunc("GET "+p+"/", s.handleRESTGet)
		mux.HandleFunc("POST "+p+"/", s.handleRESTSet)
		mux.HandleFunc("DELETE "+p+"/", s.handleRESTDelete)
	}
	// Every other method: ServeMux would answer 405 itself, but with a
	// plain-text body, and every error here is JSON.
	mux.HandleFunc("/", s.handleMethodNotAllowed)

	var h http.Handler = mux
	if s.access != nil {
		h = s.guard(h)
	}
	h = s.cors(s.observe(h))
	if s.cfg.logRequests {
		h = logRequests(s.log, h)
	}
	return h
}

// Header values shared by every response. Assigning these slices to the
// header map directly, rather than through Header.Set, saves an allocation
// per header per request; net/http never modifies them.
var (
	hdrAnyOrigin     = []string{"*"}
	hdrExposed       = []string{"X-Revision, X-TTL"}
	hdrVaryOrigin    = []string{"Origin"}
	hdrJSON          = []string{"application/json"}
	hdrAllowMethods  = []string{"GET, POST, PUT, DELETE, OPTIONS"}
	hdrAllowHeaders  = []string{"Authorization, Content-Type, X-Revision, X-TTL, Last-Event-ID"}
	hdrAllow         = []string{"GET, HEAD, POST, PUT, DELETE, OPTIONS"}
	hdrPreflightLife = []string{"86400"}
)

// cors applies the origin policy to every response. It also refuses paths
// that are not in canonical form: ServeMux would redirect "/a//b" to
// "/a/b", but such a path is an invalid key, not another spelling of one.
// (ServeMux cleans the path as it came, so "/a%2F%2Fb" reaches the
// handlers as "/a//b", whose own check refuses it.)
func (s *server) cors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		if s.origins == nil {
			h["Access-Control-Allow-Origin"] = hdrAnyOrigin
		} else {
			h["Vary"] = hdrVaryOrigin
			if o := r.Header.Get("Origin"); s.origins[o] {
				h.Set("Access-Control-Allow-Origin", o)
			}
		}
		h["Access-Control-Expose-Headers"] = hdrExposed
		if p := r.URL.Path; p != "/" && path.Clean(p) != strings.TrimSuffix(p, "/") {
			err := checkPath(p, s.cfg.maxKeyBytes)
			if err == nil { // not reached: a clean path is a valid one's only spelling
				err = fmt.Errorf("invalid path %s", quoteKey(p))
			}
			serveError(w, http.StatusBadRequest, err.Error())
			return
		}
		next.ServeHTTP(w, r)
	})
}

// handlePreflight answers a CORS preflight request.
func (s *server) handlePreflight(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h["Access-Control-Allow-Methods"] = hdrAllowMethods
	h["Access-Control-Allow-Headers"] = hdrAllowHeaders
	h["Access-Control-Max-Age"] = hdrPreflightLife
	h["Allow"] = hdrAllow
	w.WriteHeader(http.StatusNoContent)
}

// handleMethodNotAllowed answers a method the API does not have.
func (s *server) handleMethodNotAllowed(w http.ResponseWriter, r *http.Request) {
	w.Header()["Allow"] = hdrAllow
	serveError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed", r.Method))
}

// handleRoot answers GET /: the JavaScript client; or, upgraded, the
// WebSocket API; or with Accept: application/json the listing of every
// key; or with Accept: text/event-stream the changes of every key.
func (s *server) handleRoot(w http.ResponseWriter, r *http.Request) {
	if isWebSocket(r) {
		s.handleWebSocket(w, r)
		return
	}
	if accepts(r, "text/event-stream") {
		s.handleEvents(w, r, "/")
		return
	}
	if accepts(r, "application/json") {
		s.serveList(w, "/")
		return
	}
	h := w.Header()
	h.Set("ETag", s.clientETag)
	h.Set("Cache-Control", "no-cache")
	if inm := r.Header.Get("If-None-Match"); inm != "" && strings.Contains(inm, s.clientETag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	h.Set("Content-Type", "text/javascript; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(clientJS)))
	w.Write(clientJS)
}

// handleGet answers GET of a key (its value) or of a prefix ending with
// "/" (the listing of the keys under it), or with Accept:
// text/event-stream the changes of either.
func (s *server) handleGet(w http.ResponseWriter, r *http.Request) {
	key := r.URL.Path
	if accepts(r, "text/event-stream") {
		s.handleEvents(w, r, key)
		return
	}
	if strings.HasSuffix(key, "/") {
		if err := checkPath(key, s.cfg.maxKeyBytes); err != nil {
			serveError(w, http.StatusBadRequest, err.Error())
			return
		}
		s.serveList(w, key)
		return
	}
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return
	}
	e := s.store.Get(key)
	if e == nil {
		w.Header()["X-Revision"] = hdrNoRevision
		serveError(w, http.StatusNotFound, "no such key")
		return
	}
	s.serveEntry(w, http.StatusOK, e)
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

// serveList answers the listing of every key under prefix.
func (s *server) serveList(w http.ResponseWriter, prefix string) {
	buf := getBuffer()
	defer putBuffer(buf)
	b := s.appendList(buf.AvailableBuffer(), prefix)
	w.Header()["Content-Type"] = hdrJSON
	w.Write(b)
}

// appendList appends the JSON array of every key under prefix.
func (s *server) appendList(b []byte, prefix string) []byte {
	now := s.store.now()
	b = append(b, '[')
	for i, it := range s.store.List(prefix) {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendItem(b, it, now)
	}
	return append(b, ']')
}

// appendItem appends the JSON object {"key","value","revision"[,"ttl"]}
// of it; ttl is the milliseconds it has left at now.
func appendItem(b []byte, it item, now int64) []byte {
	b = append(b, `{"key":`...)
	b = appendKey(b, it.key)
	b = append(b, `,"value":`...)
	b = append(b, it.value...)
	b = append(b, `,"revision":`...)
	b = strconv.AppendInt(b, it.revision, 10)
	if ms, ok := it.ttlLeft(now); ok {
		b = append(b, `,"ttl":`...)
		b = strconv.AppendInt(b, ms, 10)
	}
	return append(b, '}')
}

// handleSet answers POST: set a key unconditionally.
func (s *server) handleSet(w http.ResponseWriter, r *http.Request) {
	key, value, ttl, ok := s.readWrite(w, r)
	if !ok {
		return
	}
	e, err := s.store.Set(key, value, ttl)
	s.serveWritten(w, e, err)
}

// handleUpdate answers PUT: compare-and-swap a key. X-Revision is the
// revision the write will have.
func (s *server) handleUpdate(w http.ResponseWriter, r *http.Request) {
	rev, ok := revisionHeader(w, r, true)
	if !ok {
		return
	}
	key, value, ttl, ok := s.readWrite(w, r)
	if !ok {
		return
	}
	e, err := s.store.CompareAndSwap(key, value, rev, ttl)
	s.serveWritten(w, e, err)
}

// handleDelete answers DELETE: remove a key, if X-Revision is given only
// at that revision.
func (s *server) handleDelete(w http.ResponseWriter, r *http.Request) {
	key := r.URL.Path
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return
	}
	rev, ok := revisionHeader(w, r, false)
	if !ok {
		return
	}
	existed, err := s.store.Delete(key, rev)
	if err != nil {
		s.serveWritten(w, nil, err)
		return
	}
	w.Header()["Content-Type"] = hdrJSON
	fmt.Fprintf(w, `{"deleted":%t}`, existed)
}

// revisionHeader parses X-Revision. Without the header it returns -1, or
// answers 400 if required.
func revisionHeader(w http.ResponseWriter, r *http.Request, required bool) (int64, bool) {
	h := r.Header.Get("X-Revision")
	if h == "" {
		if required {
			serveError(w, http.StatusBadRequest, "missing X-Revision header: the revision the write will have (0 to create)")
			return 0, false
		}
		return -1, true
	}
	rev, err := strconv.ParseInt(h, 10, 64)
	if err != nil || rev < 0 {
		serveError(w, http.StatusBadRequest, fmt.Sprintf("invalid X-Revision %q: want a revision number >= 0", h))
		return 0, false
	}
	return rev, true
}

// readWrite checks the key and TTL of a write and reads its value. On
// failure it has answered the request.
func (s *server) readWrite(w http.ResponseWriter, r *http.Request) (key, value string, ttl time.Duration, ok bool) {
	key = r.URL.Path
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return "", "", 0, false
	}
	// X-TTL wins over ?ttl=. The query is looked at only when the raw
	// query is not empty, so a plain write parses nothing.
	t := r.Header.Get("X-TTL")
	if t == "" && r.URL.RawQuery != "" {
		t = r.URL.Query().Get("ttl")
	}
	if t != "" {
		var err error
		if ttl, err = parseTTL(t); err != nil {
			serveError(w, http.StatusBadRequest, err.Error())
			return "", "", 0, false
		}
	}
	value, err := readValue(w, r, s.cfg.maxValueBytes)
	if err != nil {
		code := http.StatusBadRequest
		if errors.As(err, new(*http.MaxBytesError)) {
			code = http.StatusRequestEntityTooLarge
			err = fmt.Errorf("value larger than %d bytes", s.cfg.maxValueBytes)
		}
		serveError(w, code, err.Error())
		return "", "", 0, false
	}
	return key, value, ttl, true
}

// readValue reads a request body of at most max bytes that must be one
// JSON value, and returns it compacted. json.Compact validates as it goes,
// so the value is scanned once; it is never decoded, which keeps numbers
// and member order exactly as written.
func readValue(w http.ResponseWriter, r *http.Request, max int64) (string, error) {
	if r.ContentLength > max {
		return "", &http.MaxBytesError{Limit: max}
	}
	body := getBuffer()
	defer putBuffer(body)
	src := r.Body
	if r.ContentLength < 0 {
		// Chunked: only the reader can enforce the limit. With a known
		// length net/http already stops the body there.
		src = http.MaxBytesReader(w, r.Body, max)
	}
	if _, err := body.ReadFrom(src); err != nil {
		return "", err
	}
	return compactValue(body.Bytes())
}

// compactValue checks that src is one JSON value and returns it compacted.
func compactValue(src []byte) (string, error) {
	out := getBuffer()
	defer putBuffer(out)
	if err := json.Compact(out, src); err != nil {
		return "", fmt.Errorf("invalid JSON value: %v", err)
	}
	return out.String(), nil
}

// valueAndTTL checks the value and TTL of a write that came inside a
// JSON envelope (a WebSocket message, KvServer's REST body): the value
// must be there (null is a value) and, compacted, fit -max-value-bytes;
// the TTL may be absent or null.
func (s *server) valueAndTTL(rawValue, rawTTL json.RawMessage) (string, time.Duration, error) {
	if rawValue == nil {
		return "", 0, errors.New(`missing "value" (null is a value: send "value": null)`)
	}
	value, err := compactValue(rawValue)
	if err != nil {
		return "", 0, err
	}
	if int64(len(value)) > s.cfg.maxValueBytes {
		return "", 0, &tooLargeError{s.cfg.maxValueBytes}
	}
	var ttl time.Duration
	if rawTTL != nil && string(rawTTL) != "null" {
		if ttl, err = ttlFromJSON(rawTTL); err != nil {
			return "", 0, err
		}
	}
	return value, ttl, nil
}

// tooLargeError is a value past -max-value-bytes.
type tooLargeError struct{ max int64 }

func (e *tooLargeError) Error() string { return fmt.Sprintf("value larger than %d bytes", e.max) }

// serveWritten answers a write: the new revision, or the error.
func (s *server) serveWritten(w http.ResponseWriter, e *entry, err error) {
	var conflict *conflictError
	switch {
	case errors.As(err, &conflict):
		s.serveEntry(w, http.StatusConflict, conflict.cur)
	case errors.Is(err, errFull):
		serveError(w, http.StatusInsufficientStorage, s.writeErrorMessage(err))
	case errors.Is(err, errNotWritten):
		serveError(w, http.StatusServiceUnavailable, s.writeErrorMessage(err))
	case err != nil:
		serveError(w, http.StatusInternalServerError, s.writeErrorMessage(err))
	default:
		rev := strconv.FormatInt(e.revision, 10)
		h := w.Header()
		h["Content-Type"] = hdrJSON
		h["X-Revision"] = []string{rev}
		io.WriteString(w, `{"revision":`)
		io.WriteString(w, rev)
		io.WriteString(w, `}`)
	}
}

// writeErrorMessage is what a client is told of a failed write other than
// a conflict. An unexpected error is logged, and the client told no more.
func (s *server) writeErrorMessage(err error) string {
	switch {
	case errors.Is(err, errFull):
		return fmt.Sprintf("store is full: at most %d keys", s.cfg.maxKeys)
	case errors.Is(err, errNotWritten):
		return "the server could not write its data files, and is stopping"
	}
	s.log.Error("write failed", "err", err)
	return "internal error"
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
