package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"
)

// KvServer's REST shape, served under -kvserver-rest (e.g. /storage) so
// that clients written for KvServer work unchanged:
//
//	GET    /storage/{key}  200 {"value": …}, or 204 if missing
//	POST   /storage/{key}  body {"value": any, "ttl"?: ms | "10m"}: 202, or 400
//	DELETE /storage/{key}  200, whether or not it existed
//	PUT    /storage/{key}  405: KvServer has no PUT, and no native route acts under the prefix
//
// A KvServer key "foo" or "a/b" is the store key "/foo" or "/a/b", the
// same key the native API and the WebSocket see; routes reads it from the
// decoded path, so /storage%2Fa%2Fb is /storage/a/b, the key /a/b. The
// prefix alone (/storage, /storage/) is KvServer's empty key: 400.
// Failures answer with the REST column of outcomeTable.

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

// handleRESTGet answers KvServer's GET: {"value": …} or 204.
func (s *server) handleRESTGet(w http.ResponseWriter, r *http.Request, key string) outcome {
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	if err := s.store.journal.current(r.Context()); err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	e := s.store.Get(key)
	if e == nil {
		w.WriteHeader(http.StatusNoContent)
		return outcomeOK
	}
	w.Header()["Content-Type"] = hdrJSON
	io.WriteString(w, `{"value":`+e.value+`}`)
	return outcomeOK
}

// handleRESTSet answers KvServer's POST: {"value": any, "ttl"?: …} → 202.
func (s *server) handleRESTSet(w http.ResponseWriter, r *http.Request, key string) outcome {
	value, ttl, err := s.readRESTWrite(w, r, key)
	if err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	if _, err := s.store.Set(key, value, ttl); err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	w.WriteHeader(http.StatusAccepted)
	return outcomeOK
}

// readRESTWrite checks the key of a KvServer POST and reads the value and
// TTL from its body.
func (s *server) readRESTWrite(w http.ResponseWriter, r *http.Request, key string) (string, time.Duration, error) {
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return "", 0, err
	}
	body := getBuffer()
	defer putBuffer(body)
	if err := readBody(w, r, body, s.readLimit()); err != nil {
		return "", 0, err
	}
	var req struct {
		Value json.RawMessage `json:"value"`
		TTL   json.RawMessage `json:"ttl"`
	}
	if err := json.Unmarshal(body.Bytes(), &req); err != nil {
		return "", 0, errors.New(`invalid body: want {"value": any, "ttl"?: number | string}`)
	}
	return s.valueAndTTL(req.Value, req.TTL)
}

// handleRESTDelete answers KvServer's DELETE: 200 whether or not the key
// existed.
func (s *server) handleRESTDelete(w http.ResponseWriter, r *http.Request, key string) outcome {
	if err := checkKey(key, s.cfg.maxKeyBytes); err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	if _, err := s.store.Delete(key, -1); err != nil {
		return s.serveFailure(w, apiREST, err)
	}
	w.WriteHeader(http.StatusOK)
	return outcomeOK
}
