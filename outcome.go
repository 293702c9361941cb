// Outcomes: every way a read or a write can fail, and how each interface
// reports it. outcomeOf is the one place that says which failure an error
// is; outcomeTable is the one place that says what the native HTTP
// API, KvServer's REST shape, the WebSocket and the metrics call it.

package main

import (
	"errors"
	"fmt"
	"net/http"
)

// An outcome is how a request ended.
type outcome uint8

const (
	outcomeOK outcome = iota
	outcomeConflict
	outcomeBadRequest // bad key, path, JSON, TTL, revision; a missing value
	outcomeTooLarge
	outcomeFull
	outcomeNoToken   // a token is needed and none came, or an unknown one
	outcomeForbidden // the token does not allow it
	outcomeUnavailable
	outcomes
)

// outcomeTable is what each interface answers for each outcome. KvServer's
// REST contract knows only 202 and 400 for a write (SPEC 3), so a value
// too large is a 400 there; what it has no word for (a full store, a
// token, a failed disk) it answers as the native API does. A WebSocket
// reports every failure as an error message, and a conflict as conflict
// with the current state.
var outcomeTable = [outcomes]struct {
	name   string // in tests and logs
	http   int    // status of the native API
	rest   int    // status of KvServer's REST shape
	ws     string // type of the WebSocket reply
	result int    // label of atomkv_writes_total
}{
	outcomeOK:          {"ok", http.StatusOK, http.StatusOK, "ok", resultOK},
	outcomeConflict:    {"conflict", http.StatusConflict, http.StatusConflict, "conflict", resultConflict},
	outcomeBadRequest:  {"bad request", http.StatusBadRequest, http.StatusBadRequest, "error", resultBadRequest},
	outcomeTooLarge:    {"too large", http.StatusRequestEntityTooLarge, http.StatusBadRequest, "error", resultTooLarge},
	outcomeFull:        {"full", http.StatusInsufficientStorage, http.StatusInsufficientStorage, "error", resultFull},
	outcomeNoToken:     {"no token", http.StatusUnauthorized, http.StatusUnauthorized, "error", resultDenied},
	outcomeForbidden:   {"forbidden", http.StatusForbidden, http.StatusForbidden, "error", resultDenied},
	outcomeUnavailable: {"unavailable", http.StatusServiceUnavailable, http.StatusServiceUnavailable, "error", resultUnavailable},
}

func (o outcome) String() string { return outcomeTable[o].name }

// outcomeOf says which outcome err is. The server's own failures and
// the refusals are typed (errFull, errNotWritten, conflictError,
// tooLargeError, accessError); every other error is a message about what
// the client sent, and so a bad request.
func outcomeOf(err error) outcome {
	var conflict *conflictError
	var refused *accessError
	var tooLarge *tooLargeError
	switch {
	case err == nil:
		return outcomeOK
	case errors.As(err, &conflict):
		return outcomeConflict
	case errors.Is(err, errFull):
		return outcomeFull
	case errors.Is(err, errNotWritten), errors.As(err, new(*unavailableError)):
		return outcomeUnavailable
	case errors.As(err, &refused):
		if refused.code == http.StatusUnauthorized {
			return outcomeNoToken
		}
		return outcomeForbidden
	case errors.As(err, &tooLarge):
		return outcomeTooLarge
	}
	return outcomeBadRequest
}

// errorMessage is what a client is told of err, on every interface.
func (s *server) errorMessage(err error) string {
	switch outcomeOf(err) {
	case outcomeFull:
		return fmt.Sprintf("store is full: at most %d keys", s.cfg.maxKeys)
	case outcomeUnavailable:
		var unavailable *unavailableError
		if errors.As(err, &unavailable) {
			return unavailable.msg
		}
		return "the server could not write its data files, and is stopping"
	}
	return err.Error()
}

// An api is one of the two HTTP shapes, which answer the same outcome
// with their own status codes.
type api bool

const (
	apiNative api = false
	apiREST   api = true
)

// status is the HTTP status of outcome o in the shape a.
func (a api) status(o outcome) int {
	if a == apiREST {
		return outcomeTable[o].rest
	}
	return outcomeTable[o].http
}

// serveFailure answers a request that failed with err (not a conflict,
// which answers with the current state): the status of its outcome in
// shape a, and {"error": message}. It returns the outcome.
func (s *server) serveFailure(w http.ResponseWriter, a api, err error) outcome {
	o := outcomeOf(err)
	serveError(w, a.status(o), s.errorMessage(err))
	return o
}

// tooLargeError is a value (or a body holding one) past its limit.
type tooLargeError struct {
	what string // "value" or "body"
	max  int64
}

func (e *tooLargeError) Error() string { return fmt.Sprintf("%s larger than %d bytes", e.what, e.max) }
