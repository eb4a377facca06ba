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
only on the same scheme, host and port, since it gets the same headers). A failed
request stops the run: without the list there is nothing to do. Messages never show
headers or query strings (they hold secrets).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from pipeline.config.model import Options
from pipeline.errors import RunIncompleteError
from pipeline.stages.base import Source, SourceItem
from pipeline.stages.registry import register


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

    timeout: PositiveFloat = Field(30.0, description="Seconds per request")
    retries: NonNegativeInt = Field(3, description="Retries on connection errors, 429 and 5xx")


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


def _where(url: str) -> str:
    """The URL without credentials or query string: safe to print."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@register("http_json")
class HttpJson(Source):
    """Image links from a paginated JSON API."""

    Options = HttpJsonOptions
    description = "Image links from a JSON API (headers, params, filters, pages)"

    def iter_items(self) -> Iterator[SourceItem]:
        options: HttpJsonOptions = self.options  # type: ignore[assignment]
        index = 0
        for document in self.documents():
            found = elements(document, options.items)
            if not found:
                return
            for element in found:
                link = at(element, options.link) if isinstance(element, dict) else None
                if isinstance(link, str) and self.wanted(element):
                    index += 1
                    yield SourceItem(index, link, {f: at(element, f) for f in options.fields})

    def documents(self) -> Iterator[Any]:
        """Each page's JSON answer, in order, while there is a next page to ask for."""
        options: HttpJsonOptions = self.options  # type: ignore[assignment]
        url, params = options.url, dict(options.params)
        for page in range(options.start_page, options.start_page + options.pages):
            if options.page_param:
                params[options.page_param] = page
            document = self.fetch(url.replace("{page}", str(page)), params)
            yield document
            if options.next_cursor:
                cursor = at(document, options.next_cursor)
                if cursor in (None, ""):
                    return
                params[options.cursor_param] = str(cursor)
            if options.next_url:
                following = at(document, options.next_url)
                if not isinstance(following, str) or not following:
                    return
                url, params = self.same_origin(url, following), {}

    def wanted(self, element: dict[str, Any]) -> bool:
        where = self.options.where  # type: ignore[attr-defined]
        return all(at(element, field) in values for field, values in where.items())

    def same_origin(self, current: str, following: str) -> str:
        """The next page's URL, resolved against the current one; RunIncompleteError if
        it leaves the current scheme, host and port (it would get the same headers)."""
        resolved = urljoin(current, following)
        if urlsplit(resolved)[:2] != urlsplit(current)[:2]:
            raise RunIncompleteError(
                f"{self.name}: the next page is on {_where(resolved)}, not on "
                f"{_where(current)}: not followed (the request headers may hold secrets)"
            )
        return resolved

    def fetch(self, url: str, params: dict[str, Any]) -> Any:
        options: HttpJsonOptions = self.options  # type: ignore[assignment]
        retry = urllib3.Retry(
            total=options.retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            # a redirect to another host gets none of the configured headers (secrets)
            remove_headers_on_redirect=[
                *urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT,
                *options.headers,
            ],
        )
        try:
            response = urllib3.request(
                "GET",
                url,
                fields={k: str(v) for k, v in params.items()},
                headers=options.headers,
                timeout=options.timeout,
                retries=retry,
            )
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__  # no URL: it has secrets
            raise RunIncompleteError(f"{self.name}: GET {_where(url)} failed: {reason}") from None
        if response.status != 200:
            raise RunIncompleteError(
                f"{self.name}: GET {_where(url)} answered HTTP {response.status}: "
                f"{response.data[:200].decode('utf-8', 'replace')}"
            )
        try:
            return json.loads(response.data)
        except ValueError as exc:
            raise RunIncompleteError(
                f"{self.name}: {_where(url)} did not answer JSON: {exc}"
            ) from None
