// TypeScript declarations of the AtomKV browser client (client.js, served
// at GET / of an AtomKV server). A page loads the script with
// <script src="http://host:port/"></script>, which defines the global
// AtomKV; a TypeScript page references this file:
//
//     /// <reference path="client.d.ts" />
//     const [value, revision] = await AtomKV.get('/room/42');

/** Any JSON value: what a key holds. */
type AtomKVValue = null | boolean | number | string | AtomKVValue[] | {[member: string]: AtomKVValue};

/** A change of a key: [key, value, revision]; a delete or expiry is [key, null, -1]. */
type AtomKVEvent<T = AtomKVValue> = [key: string, value: T | null, revision: number];

/** One key of a listing. ttl: milliseconds left, only if the key has a TTL. */
interface AtomKVItem<T = AtomKVValue> {
    key: string;
    value: T;
    revision: number;
    ttl?: number;
}

/** A shallow listing's item for a deeper prefix ('/room/42/cursor/'), standing for every key under it. */
interface AtomKVPrefixItem {
    prefix: string;
}

/** What a listing asks besides its prefix; any of them makes the answer a page. */
interface AtomKVListOptions {
    /** At most this many items (1 to 10,000). */
    limit?: number;
    /** Start after this key (present or not), or with shallow after a prefix item's prefix; '' is none. */
    after?: string;
    /** The direct children only: each key directly under the prefix, and each deeper prefix once as an AtomKVPrefixItem. */
    shallow?: boolean;
}

/**
 * A listing, in key order. A page (list with any option) also carries
 * next, the after of the next page (null if none follows), and seq: every
 * change up to it is reflected in the page (subscribe from the smallest
 * seq of the pages to miss nothing). A listing without options has
 * neither.
 */
type AtomKVListing<I> = I[] & {
    next?: string | null;
    seq?: number;
};

/** A transaction's check: the key must be at this revision, as get reports it (-1: missing). */
interface AtomKVCheck {
    key: string;
    revision: number;
}

/** A transaction's op: set a key (with a TTL, or permanent), or delete it. */
type AtomKVOp =
    | {op: 'set'; key: string; value: AtomKVValue; ttl?: AtomKVTTL}
    | {op: 'delete'; key: string};

/** A transaction (SPEC 11): every op applied as one change if every check holds, else none. */
interface AtomKVTransaction {
    check?: AtomKVCheck[];
    ops: AtomKVOp[];
}

/**
 * What a transaction did: ok, its change number and each op's key's new
 * revision (-1 for a delete); or, if a check failed and nothing was
 * applied, each failed check's key at its current value and revision
 * (null and -1 if missing).
 */
type AtomKVTransactionResult =
    | {ok: true; seq: number; revisions: {[key: string]: number}}
    | {ok: false; conflicts: AtomKVItem[]};

/** A TTL: milliseconds, or a string such as '500ms', '90 sec', '1h30m', '2 weeks'. */
type AtomKVTTL = number | string;

/** How the client reaches the server (AtomKV.transport). */
type AtomKVTransport = 'auto' | 'websocket' | 'http';

/** The state of the page's connection (AtomKV.onstatus). */
type AtomKVStatus = 'connecting' | 'open' | 'closed';

/**
 * The error a write (set, update, delete, transaction, transact) rejects with when the
 * connection dropped after it was sent and before its answer came: it may
 * or may not have been applied, and it is not sent again by itself.
 * Its name is 'OutcomeUnknownError'; its message says "outcome unknown".
 */
interface AtomKVOutcomeUnknownError extends Error {
    name: 'OutcomeUnknownError';
}

interface AtomKVClient {
    /** The server, an origin such as 'http://localhost:8000'; by default the one the script came from. */
    BASE: string;
    /** A token of the server's -tokens file, sent with every request and on the socket; '' for none. */
    token: string;
    /**
     * 'auto' (the default): one WebSocket per page, and EventSource and
     * fetch if two handshakes fail before any succeeded; 'websocket':
     * never fall back; 'http': EventSource and fetch only.
     */
    transport: AtomKVTransport;
    /**
     * Called on every change of the connection's state, with the
     * transport in use or being tried; with 'http' (the fallback), 'open'
     * once, as EventSource and fetch need no connection of their own.
     */
    onstatus: ((status: AtomKVStatus, transport: 'websocket' | 'http') => void) | null;

    /** [value, revision], or [null, -1] if the key is missing. */
    get<T = AtomKVValue>(key: string): Promise<[value: T | null, revision: number]>;
    /** Sets the key unconditionally; resolves with its new revision. */
    set(key: string, value: AtomKVValue, options?: {ttl?: AtomKVTTL}): Promise<number>;
    /**
     * Compare-and-swap: true if the key now has revision (one more than
     * the revision last seen; 0 creates), false if another write came
     * first.
     */
    update(key: string, value: AtomKVValue, revision: number, options?: {ttl?: AtomKVTTL}): Promise<boolean>;
    /** true; false if a revision was given and the key is not at it. */
    delete(key: string, options?: {revision?: number}): Promise<boolean>;
    /**
     * Every key under prefix ('/' for all), in key order; with options, a
     * page of them (limit, after), or with shallow the direct children,
     * a deeper prefix as one AtomKVPrefixItem. A page carries next and seq.
     */
    list<T = AtomKVValue>(prefix: string, options?: AtomKVListOptions & {shallow?: false}): Promise<AtomKVListing<AtomKVItem<T>>>;
    list<T = AtomKVValue>(prefix: string, options: AtomKVListOptions): Promise<AtomKVListing<AtomKVItem<T> | AtomKVPrefixItem>>;
    /**
     * Applies every op as one change if every check holds ({ok: true,
     * seq, revisions}), else nothing ({ok: false, conflicts}). Other
     * failures reject with the server's message; one cut off in flight
     * with AtomKVOutcomeUnknownError.
     */
    transaction(txn: AtomKVTransaction): Promise<AtomKVTransactionResult>;
    /** Returned by a transact function for a key: delete it. */
    readonly DELETE: unique symbol;
    /**
     * Reads the keys, calls fn with their values (null for a missing key)
     * and commits what it returns, one element per key: a value to set,
     * undefined to leave the key as it is (still checked), or
     * AtomKV.DELETE. If another write changed a key read, fn runs again on
     * the new values, at most retries (default 25) times more, then it
     * rejects. fn returning undefined aborts: nothing is written and the
     * call resolves undefined; else it resolves with the values committed
     * (null for a delete). fn must be pure: it may run several times.
     * V types the values, unchecked, e.g. transact<[[number, number]]>.
     */
    transact<V extends unknown[] = AtomKVValue[]>(
        keys: string[],
        fn: (values: V) => AtomKVCommit<V> | undefined | Promise<AtomKVCommit<V> | undefined>,
        options?: {retries?: number},
    ): Promise<{[I in keyof V]: V[I] | null} | undefined>;
    /**
     * Every change of a key, of every key under a prefix ending with '/',
     * or of every key ('/'); with {initial: true}, the current state
     * first. Survives reconnects; leaving the loop ends the subscription.
     */
    subscribe<T = AtomKVValue>(path: string, options?: {initial?: boolean}): AsyncGenerator<AtomKVEvent<T>, void, undefined>;
}

/** What a transact function returns for its keys: per key a value, undefined (leave it) or AtomKV.DELETE. */
type AtomKVCommit<V extends unknown[]> = {[I in keyof V]: V[I] | undefined | AtomKVClient['DELETE']};

declare const AtomKV: AtomKVClient;
