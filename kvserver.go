package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// KvServer's REST shape, served under -kvserver-rest (e.g. /storage) so
// that clients written for KvServer work unchanged:
//
//	GET    /storage/{key}  200 {"value": …}, or 204 if missing
//	POST   /storage/{key}  body {"value": any, "ttl"?: ms | "10m"}: 202, or 400
//	DELETE /storage/{key}  200, whether or not it existed
//
// A KvServer key "foo" or "a/b" is the store key "/foo" or "/a/b", the
// same key the native API and the WebSocket see.

// checkRESTPrefix checks the -kvserver-rest flag: "" (off) or a path like
// "/storage" whose components are valid key components.
func checkRESTPrefix(prefix string) error {
	if prefix == "" {
		return nil
	}
	if checkKey(prefix, 1<<10) != nil {
		return fmt.Errorf("-kvserver-rest %q: want a path like /storage", prefix)
	}
	return nil
}

// restKey returns the store key of a KvServer REST request, or answers 400.
func (s *server) restKey(w http.ResponseWriter, r *http.Request) (string, bool) {
	key := strings.TrimPrefix(r.URL.Path, s.cfg.kvserverREST)
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return "", false
	}
	return key, true
}

// handleRESTGet answers KvServer's GET: {"value": …} or 204.
func (s *server) handleRESTGet(w http.ResponseWriter, r *http.Request) {
	key, ok := s.restKey(w, r)
	if !ok {
		return
	}
	e := s.store.Get(key)
	if e == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	w.Header()["Content-Type"] = hdrJSON
	io.WriteString(w, `{"value":`+e.value+`}`)
}

// handleRESTSet answers KvServer's POST: {"value": any, "ttl"?: …} → 202.
func (s *server) handleRESTSet(w http.ResponseWriter, r *http.Request) {
	key, ok := s.restKey(w, r)
	if !ok {
		return
	}
	body := getBuffer()
	defer putBuffer(body)
	// The envelope holds the value; give it room beyond the value limit.
	max := s.cfg.maxValueBytes + 4096
	if _, err := body.ReadFrom(http.MaxBytesReader(w, r.Body, max)); err != nil {
		serveError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", max))
		return
	}
	var req struct {
		Value json.RawMessage `json:"value"`
		TTL   json.RawMessage `json:"ttl"`
	}
	if err := json.Unmarshal(body.Bytes(), &req); err != nil {
		serveError(w, http.StatusBadRequest, `invalid body: want {"value": any, "ttl"?: number | string}`)
		return
	}
	value, ttl, err := s.valueAndTTL(req.Value, req.TTL)
	if err != nil {
		serveError(w, http.StatusBadRequest, err.Error())
		return
	}
	if _, err := s.store.Set(key, value, ttl); err != nil {
		s.serveWritten(w, nil, err)
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

// handleRESTDelete answers KvServer's DELETE: 200 always.
func (s *server) handleRESTDelete(w http.ResponseWriter, r *http.Request) {
	key, ok := s.restKey(w, r)
	if !ok {
		return
	}
	s.store.Delete(key, -1)
	w.WriteHeader(http.StatusOK)
}
