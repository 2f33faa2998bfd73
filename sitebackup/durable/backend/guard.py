"""What every RPC of the embedded backend passes through: the secret a TCP client must present, and a
damaged database turned into one ``DATA_LOSS`` answer.

A TCP endpoint is reachable by every local user (loopback is not private), so ``serve`` requires
``authorization: Bearer TOKEN`` on every call; the unix socket is owner-only and needs none. Once
a request finds the database damaged, every later request fails the same way at once instead of
working on state that can no longer be trusted.
"""

from __future__ import annotations

import hmac
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import grpc

from .statedir import Damage, is_corrupt

AUTH_HEADER = "authorization"
_UNAUTHENTICATED = ("this endpoint requires the token of `sitebackup serve`: "
                    "TokenFile=PATH in the task hub connection string, or SITEBACKUP_SERVE_TOKEN")
# Each kind of RPC behaviour a handler may have, the factory that makes a handler of that kind, and
# whether the behaviour answers with a stream.
_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]], bool], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)
# An RPC's behaviour: (request, context) -> response, or an iterator of them when streaming.
_Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry a client sends to present *token*."""
    return AUTH_HEADER, f"Bearer {token}"


class Guard(grpc.ServerInterceptor):
    def __init__(self, damage: Damage, token: str | None = None):
        """*token*: what every call must present (None: no check, for the owner-only unix socket)."""
        self.damage = damage
        self._expected = None if token is None else f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        wrap = self._guard if self._authorized(handler_call_details.invocation_metadata) else self._deny
        for kind, make_handler, streaming in _KINDS:
            behaviour: _Behaviour | None = getattr(handler, kind)
            if behaviour is not None:
                return make_handler(wrap(behaviour, streaming), handler.request_deserializer,
                                    handler.response_serializer)
        return handler

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        if self._expected is None:
            return True
        presented = [value for key, value in metadata or () if key == AUTH_HEADER]
        return len(presented) == 1 and hmac.compare_digest(str(presented[0]).encode(), self._expected)

    @staticmethod
    def _deny(behaviour: _Behaviour, streaming: bool) -> _Behaviour:
        def deny(request: Any, context: grpc.ServicerContext) -> NoReturn:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        return deny

    def _guard(self, behaviour: _Behaviour, streaming: bool) -> _Behaviour:
        def check(context: grpc.ServicerContext) -> None:
            if self.damage.message is not None:
                context.abort(grpc.StatusCode.DATA_LOSS, self.damage.message)

        def failed(ex: sqlite3.DatabaseError, context: grpc.ServicerContext) -> NoReturn:
            if not is_corrupt(ex):
                raise ex
            context.abort(grpc.StatusCode.DATA_LOSS, self.damage.note(ex))

        if streaming:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                check(context)
                try:
                    yield from behaviour(request, context)
                except sqlite3.DatabaseError as ex:
                    failed(ex, context)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            try:
                return behaviour(request, context)
            except sqlite3.DatabaseError as ex:
                failed(ex, context)
        return unary
