"""`http_json`: list image links from a JSON API (an image gallery, a search endpoint).

GET `url` with `headers` and `params`; secrets come from the environment through
the config's `${VAR}` interpolation (`Authorization: "Client-ID ${IMGUR_CLIENT_ID}"`).
`items` is a dotted path to the list of elements (`data`, `data.*.images`: `*` walks
every element of a list), `link` the path of the URL inside each element, `where`
keeps elements whose field has one of the listed values, and `fields` carries
element values (id, title) into the record. Pagination, for at most `pages` pages,
stopping at the first page with no elements: page numbers (`{page}` in the URL or a
`page_param`, from `start_page`), or what each answer names for the next page: a
cursor (`next_cursor`, sent back as `cursor_param`) or a URL (`next_url`, followed
only on the same scheme, host and port, compared as browsers do, since it gets the
same headers; a next page elsewhere is a failed page, `blocked_address`).

Every element `where` keeps is one entry, and gets one record: an element that is
not a JSON object (`invalid_input`), has no link or an empty one (`empty`), a link
that is not a string or not valid text (`invalid_input`), or one that is no URL
(`invalid_url`) fails at this stage with the element as compact JSON (`input`).
A page is read up to `max_page_bytes`. If the first page fails (no answer, a
timeout, an HTTP error, a body over the cap, not JSON) the run stops: without the
list there is nothing to do. A later page that fails is one failed record (its
URL without query string as `input`), and paging stops there; the items of
earlier pages go on. Messages never show headers or query strings (they hold secrets).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError, RunIncompleteError
from pipeline.records import SourceItem, jsonable
from pipeline.stages.base import Source
from pipeline.stages.registry import register
from pipeline.stages.shared.deadline import Deadline, watched_pool_manager
from pipeline.stages.shared.retry_after import parse_retry_after
from pipeline.stages.shared.urls import url_scheme, url_text

CHUNK = 64 * 1024
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


class HttpJsonOptions(Options):
    url: str = Field(description="Endpoint; may contain {page}")
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers")
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Query parameters"
    )
    items: str = Field("data", description="Dotted path to the list of elements ('*' = each)")
    link: str = Field("link", description="Dotted path of the image URL inside an element")
    where: dict[str, list[Any]] = Field(
        default_factory=dict, description="Keep elements whose field is one of the values"
    )
    fields: list[str] = Field(default_factory=list, description="Element keys to carry along")
    pages: PositiveInt = Field(1, description="Pages to fetch at most")
    start_page: NonNegativeInt = Field(0, description="First page number")
    page_param: str | None = Field(None, description="Query parameter carrying the page number")
    next_cursor: str | None = Field(
        None, description="Dotted path of the next page's cursor in each answer"
    )
    cursor_param: str = Field("cursor", description="Query parameter carrying the cursor")
    next_url: str | None = Field(
        None,
        description="Dotted path of the next page's URL in each answer, used as given "
        "(same host only)",
    )

    @model_validator(mode="after")
    def _one_way_to_page(self) -> HttpJsonOptions:
        if self.next_url and (self.next_cursor or self.page_param):
            other = "next_cursor" if self.next_cursor else "page_param"
            raise ValueError(f"next_url and {other} are two ways to page: keep one")
        return self

    timeout: PositiveFloat = Field(
        30.0, description="Seconds per attempt at a page: its answer, headers and body in all"
    )
    retries: NonNegativeInt = Field(3, description="Retries on connection errors, 429 and 5xx")
    max_page_bytes: PositiveInt = Field(
        32 * 1024 * 1024, description="Largest page body read, in bytes (after decompression)"
    )


def walk(value: Any, path: list[str]) -> Iterator[Any]:
    """Every value at `path` in a JSON document; `*` branches over a list's elements."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if head == "*" and isinstance(value, list):
        for element in value:
            yield from walk(element, rest)
    elif isinstance(value, dict) and head in value:
        yield from walk(value[head], rest)
    elif isinstance(value, list) and head.isdigit() and int(head) < len(value):
        yield from walk(value[int(head)], rest)


def at(value: Any, path: str) -> Any:
    """The first value at a dotted path, or None."""
    return next(walk(value, path.split(".")), None)


def elements(document: Any, path: str) -> list[Any]:
    """The elements at `path`: lists found there are flattened into one list."""
    found: list[Any] = []
    for value in walk(document, path.split(".") if path else []):
        found.extend(value if isinstance(value, list) else [value])
    return found


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (`object`, `number`, ...)."""
    return JSON_TYPES.get(type(value), "number")


def compact(element: Any) -> str:
    """An element as compact JSON, the way a record shows it (`input`)."""
    return json.dumps(element, ensure_ascii=False, separators=(",", ":"))


def checked_link(link: Any, path: str) -> str:
    """`link` if it is a usable URL, else ItemError: empty, not text, or no URL."""
    text = url_text(link, f"the link at '{path}'")
    url_scheme(text)  # raises invalid_url for what cannot be parsed as a URL
    return text


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) as a browser compares them: case-blind, default ports filled
    in; ValueError for a port that is not a number."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(scheme)


def _where(url: str) -> str:
    """The URL without credentials or query string: safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed)"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _failure(error: urllib3.exceptions.HTTPError) -> tuple[str, str]:
    """The reason code and a message without URL (it may hold secrets) of a failed GET."""
    errors = urllib3.exceptions
    cause = error.reason if isinstance(error, errors.MaxRetryError) else error
    if isinstance(cause, errors.LocationValueError):  # its text shows the URL
        return "invalid_url", "the URL cannot be parsed"
    if isinstance(cause, errors.DecodeError):  # the server's content coding is broken
        return "protocol_error", str(cause)
    if isinstance(cause, errors.NewConnectionError):  # a subclass of ConnectTimeoutError
        reason = "connection_error"
    elif isinstance(cause, errors.TimeoutError):
        reason = "timeout"
    elif isinstance(cause, errors.ResponseError):
        reason = "too_many_redirects"
    else:
        reason = "connection_error"
    return reason, str(cause) or type(cause).__name__


def _status_reason(status: int) -> str:
    if status == 429:
        return "rate_limited"
    return {4: "http_4xx", 5: "http_5xx"}.get(status // 100, "protocol_error")


def read_body(response: urllib3.BaseHTTPResponse, cap: int) -> bytes:
    """The body, read a chunk at a time: ItemError once it passes `cap` bytes
    (`too_large`). A server that drips it is cut off by the attempt's deadline."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap and "Content-Encoding" not in response.headers:
        raise ItemError("too_large", f"the page has {declared} bytes, over max_page_bytes {cap}")
    size, chunks = 0, []
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > cap:
            raise ItemError("too_large", f"the page is over max_page_bytes ({cap} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


RETRIED = frozenset({"connection_error", "timeout"})  # and RETRIED_STATUSES
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF = 0.5  # a retry waits BACKOFF x 2**n seconds (none before the first) ...
BACKOFF_MAX = 120.0  # ... and at most this long
RETRY_AFTER_MAX = 60.0  # the longest Retry-After a page's server is given, in seconds
MAX_REDIRECTS = 10


class _Retryable(Exception):
    """A failed attempt worth another: its error, and the wait the server asked for."""

    def __init__(self, error: ItemError, retry_after: str | None = None):
        super().__init__(error.message)
        self.error, self.retry_after = error, retry_after

    def delay(self, attempt: int) -> float:
        """Seconds before retry `attempt + 1`: the backoff, or the Retry-After (capped)."""
        asked = parse_retry_after(self.retry_after or "") or 0.0  # not a time: ignored
        backoff = min(BACKOFF * 2**attempt, BACKOFF_MAX) if attempt else 0.0  # urllib3's
        return max(backoff, min(asked, RETRY_AFTER_MAX))


def _on_page(failure: Exception, url: str) -> Exception:
    """The failure with its message naming the page (without query string: secrets)."""
    error = failure.error if isinstance(failure, _Retryable) else failure
    assert isinstance(error, ItemError)
    named = ItemError(error.reason, f"GET {_where(url)}: {error.message}")
    if isinstance(failure, _Retryable):
        failure.error = named
        return failure
    return named


# Pages are read through connections whose socket the attempt's deadline may cut.
POOL = watched_pool_manager()


@register("http_json")
class HttpJson(Source[HttpJsonOptions]):
    """Image links from a paginated JSON API."""

    Options = HttpJsonOptions
    description = "Image links from a JSON API (headers, params, filters, pages)"

    def iter_items(self) -> Iterator[SourceItem]:
        index = 0
        for page, document in self.documents():
            if isinstance(document, ItemError):  # a later page failed: paging stops
                yield SourceItem.invalid(index + 1, page, document.reason, document.message)
                return
            found = elements(document, self.options.items)
            if not found:
                return
            for element in found:
                if isinstance(element, dict) and not self.wanted(element):
                    continue
                index += 1
                build = partial(self.item, index, element, page)
                yield self.entry(index, compact(element), build)

    def item(self, index: int, element: Any, page: str) -> SourceItem:
        """The item of one element; ItemError if it is not an object with a usable link.
        A relative link is taken relative to its page (never as a local path)."""
        if not isinstance(element, dict):
            raise ItemError("invalid_input", f"the element is a JSON {json_type(element)}")
        link = checked_link(at(element, self.options.link), self.options.link)
        url = urljoin(page, link)
        fields = {name: jsonable(at(element, name)) for name in self.options.fields}
        return SourceItem(index, url, fields, input=None if url == link else link)

    def documents(self) -> Iterator[tuple[str, Any]]:
        """(URL without query, JSON answer) of each page, in order, while there is a next
        page to ask for; a later page that fails comes as its ItemError, and is the last."""
        url, params = self.options.url, dict(self.options.params)
        for page in range(self.options.start_page, self.options.start_page + self.options.pages):
            if self.options.page_param:
                params[self.options.page_param] = page
            target = url.replace("{page}", str(page))
            try:
                document = self.fetch(target, params)
            except ItemError as error:
                if page == self.options.start_page:  # no list at all: nothing to do
                    raise RunIncompleteError(f"{self.name}: {error.message}") from None
                yield _where(target), error
                return
            yield _where(target), document
            if self.options.next_cursor:
                cursor = at(document, self.options.next_cursor)
                if cursor in (None, ""):
                    return
                params[self.options.cursor_param] = str(cursor)
            if self.options.next_url:
                following = at(document, self.options.next_url)
                if not isinstance(following, str) or not following:
                    return
                try:
                    url, params = self.same_origin(url, following), {}
                except ItemError as error:  # shown as a failure of the page that named it
                    yield _where(target), error
                    return

    def wanted(self, element: dict[str, Any]) -> bool:
        where = self.options.where
        return all(at(element, field) in values for field, values in where.items())

    def same_origin(self, current: str, following: str) -> str:
        """The next page's URL, resolved against the current one; ItemError if it cannot
        be parsed, or leaves the current scheme, host and port (`blocked_address`: it
        would get the same headers, which may hold secrets)."""
        try:
            resolved = urljoin(current, following)
            same = origin(resolved) == origin(current)
        except ValueError as exc:
            raise ItemError("invalid_url", f"the next page's URL cannot be parsed: {exc}") from None
        if not same:
            raise ItemError(
                "blocked_address",
                f"the next page is on {_where(resolved)}, not on {_where(current)}: "
                "not followed (the request headers may hold secrets)",
            )
        return resolved

    def fetch(self, url: str, params: dict[str, Any]) -> Any:
        """The JSON answer of a GET, tried again after a connection error, a timeout, a
        429 or a 5xx (`retries` times, backing off, a Retry-After honoured up to
        RETRY_AFTER_MAX); ItemError (a reason, a message without secrets)."""
        attempt = 0
        while True:
            try:
                return self.attempt(url, params)
            except _Retryable as failure:
                if attempt >= self.options.retries:
                    raise failure.error from None
                time.sleep(failure.delay(attempt))
            attempt += 1

    def attempt(self, url: str, params: dict[str, Any]) -> Any:
        """One GET, its answer and body within `timeout` seconds in all (a server that
        drips its headers is cut off too); _Retryable if it is worth another."""
        with Deadline(self.options.timeout) as deadline:
            try:
                response = self.request(url, params)
                try:
                    document = self.answer(response)
                finally:
                    response.close()  # a body left unread (an error, too large) ends it
                if not deadline.expired:
                    return document
                failure: Exception = self._timed_out()
            except urllib3.exceptions.HTTPError as error:
                failure = ItemError(*_failure(error))
            except (ItemError, _Retryable) as error:
                failure = error
        if deadline.expired:  # whatever it looked like, the attempt ran out of time
            failure = self._timed_out()
        if isinstance(failure, ItemError) and failure.reason in RETRIED:
            failure = _Retryable(failure)
        raise _on_page(failure, url)

    def _timed_out(self) -> ItemError:
        return ItemError("timeout", f"no whole answer within {self.options.timeout} s")

    def request(self, url: str, params: dict[str, Any]) -> urllib3.BaseHTTPResponse:
        """The response's head; its body is left to read (it may be too large)."""
        return POOL.request(
            "GET",
            url,
            fields={k: str(v) for k, v in params.items()},
            headers=self.options.headers,
            timeout=self.options.timeout,
            retries=urllib3.Retry(
                total=None,
                connect=0,
                read=0,
                status=0,
                other=0,
                redirect=MAX_REDIRECTS,
                raise_on_redirect=True,
                # a redirect to another host gets none of the configured headers (secrets)
                remove_headers_on_redirect=[
                    *urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT,
                    *self.options.headers,
                ],
            ),
            preload_content=False,
        )

    def answer(self, response: urllib3.BaseHTTPResponse) -> Any:
        """The decoded JSON of a 200 answer; ItemError for any other."""
        if response.status != 200:
            text = response.read(200).decode("utf-8", "replace")
            error = ItemError(_status_reason(response.status), f"HTTP {response.status}: {text}")
            if response.status in RETRIED_STATUSES:
                raise _Retryable(error, response.headers.get("Retry-After"))
            raise error
        body = read_body(response, self.options.max_page_bytes)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ItemError("invalid_input", f"not JSON: {exc}") from None
