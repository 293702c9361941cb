// AtomKV client: shared JSON state with compare-and-swap and live updates.
// Load it with <script src="http://host:port/"></script>; it talks to the
// server it was loaded from (AtomKV.BASE, which a page may change).
'use strict';
var AtomKV = (function () {
    const script = document.currentScript;
    const self = {
        BASE: script && script.src ? new URL(script.src).origin : '',
    };

    // request does one HTTP request and rejects with the server's own
    // message on any status it was not told to expect.
    async function request(method, key, {body, headers = {}, ok = []} = {}) {
        const init = {method, headers};
        if (body !== undefined) {
            init.body = JSON.stringify(body);
            headers['Content-Type'] = 'application/json';
        }
        const resp = await fetch(self.BASE + key, init);
        if (resp.ok || ok.includes(resp.status)) {
            return resp;
        }
        let message = `${method} ${key}: HTTP ${resp.status}`;
        try {
            message = (await resp.json()).error || message;
        } catch (_) {
            // not a JSON error body: keep the status line
        }
        throw new Error(message);
    }

    function revision(resp) {
        return Number(resp.headers.get('X-Revision'));
    }

    function writeHeaders(options, rev) {
        const headers = {};
        if (options && options.ttl !== undefined) {
            headers['X-TTL'] = String(options.ttl);
        }
        if (rev !== undefined) {
            headers['X-Revision'] = String(rev);
        }
        return headers;
    }

    /** get(key) → [value, revision], or [null, -1] if the key is missing. */
    self.get = async function (key) {
        const resp = await request('GET', key, {ok: [404]});
        if (resp.status === 404) {
            return [null, -1];
        }
        return [await resp.json(), revision(resp)];
    };

    /** set(key, value, {ttl}?) → the new revision. */
    self.set = async function (key, value, options) {
        const resp = await request('POST', key, {body: value, headers: writeHeaders(options)});
        return revision(resp);
    };

    /**
     * update(key, value, revision, {ttl}?) → true if the key now has the
     * given revision (one more than the one last seen; 0 creates), false
     * if another write came first.
     */
    self.update = async function (key, value, rev, options) {
        const resp = await request('PUT', key, {body: value, headers: writeHeaders(options, rev), ok: [409]});
        return resp.status !== 409;
    };

    /**
     * delete(key, {revision}?) → true; false if a revision was given and
     * the key is not at it.
     */
    self.delete = async function (key, options) {
        const rev = options && options.revision;
        const resp = await request('DELETE', key, {headers: writeHeaders(undefined, rev), ok: [409]});
        return resp.status !== 409;
    };

    /** list(prefix) → [{key, value, revision, ttl?}], sorted by key. */
    self.list = async function (prefix) {
        // GET / alone is this script; Accept asks for the listing instead.
        const path = prefix.endsWith('/') ? prefix : prefix + '/';
        const resp = await request('GET', path, {headers: {Accept: 'application/json'}});
        return resp.json();
    };

    return self;
})();
