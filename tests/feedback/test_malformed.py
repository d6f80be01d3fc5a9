"""Bad input, property-based: > 1,000 generated malformed requests per backend, each answered with a clear
status that names the offending record and field; the server stays SERVING and nothing is written.

Each write request is a batch of valid records (with fresh idempotency keys) in which one or two records are
broken in one way; the expected status names the first broken record's index and field exactly. Reads
(export, snapshots) get malformed filters, cursors and names, and raw bytes that are not a protobuf message
at all are sent to every method.
"""

from __future__ import annotations

import itertools
import math
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.core.errors import InvalidArgument
from rlhf.feedback import records as rec
from rlhf.feedback.reads import decode_cursor
from rlhf.v1 import common_pb2, feedback_pb2, feedback_pb2_grpc

from .conftest import BACKENDS, new_database_url, running_server

LIMIT = 64  # the server's max_text_chars here, so that oversized texts stay small
MAX_BATCH = 12
SETTINGS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_keys = itertools.count()
CLEAR = re.compile(r"[A-Za-z_][\w.\[\]'\"-]*: \S")  # "field.path[3].name: why"
STORED_KEY = "stored-0"


def _is_cursor(text: str) -> bool:
    try:
        decode_cursor(text)
        return True
    except InvalidArgument:
        return False


def fresh_key() -> str:
    return f"mal-{next(_keys)}"


# ---- valid records (fresh keys) -----------------------------------------------------------------------


def comparison(n_responses: int = 2):
    k = fresh_key()
    return rec.make_comparison(
        f"prompt {k}",
        [f"response {j} of {k}" for j in range(n_responses)],
        idempotency_key=k,
        chosen_index=n_responses - 1,
        labeler_id=f"lab-{k}",  # a new labeler per record: a partial write would create labelers too
        metadata={"source": "valid"},
    )


def rating():
    k = fresh_key()
    return rec.make_rating(f"prompt {k}", f"resp {k}", 3, idempotency_key=k, labeler_id=f"lab-{k}")


def demonstration():
    k = fresh_key()
    return rec.make_demonstration(
        [{"role": "user", "content": f"hi {k}"}], f"demo {k}", idempotency_key=k, labeler_id=f"lab-{k}"
    )


def prompt_record():
    k = fresh_key()
    return feedback_pb2.PromptRecord(idempotency_key=k, prompt=rec.make_prompt(f"prompt {k}"))


def labeler():
    return feedback_pb2.Labeler(id=f"lab-{fresh_key()}", kind="human")


# ---- ways to break a record: draw(...) -> (mutate(message) -> None, field suffix pattern) ---------------

bad_text = st.one_of(
    st.just(""),
    st.text(alphabet=" \t\n\r", min_size=1, max_size=5),
    st.text(min_size=LIMIT + 1, max_size=LIMIT + 30),
    st.text(max_size=10).map(lambda t: f"a{t}\x00"),
)
bad_short = st.one_of(st.text(min_size=257, max_size=300), st.text(max_size=10).map(lambda t: f"\x00{t}"))
not_a_labeler_id = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda t: re.fullmatch(r"[A-Za-z0-9._:@-]{1,128}", t) is None),
    st.just("x" * 129),
)


@st.composite
def prompt_breakage(draw):
    """Breaks record.prompt (the record has no prompt_id)."""
    choice = draw(st.sampled_from(["text", "clear", "tokens", "role", "no_messages", "content", "many"]))
    if choice == "text":
        text = draw(bad_text)
        return (lambda m: setattr(m.prompt, "text", text)), r"\.prompt\.text"
    if choice == "clear":
        return (lambda m: m.ClearField("prompt")), r"\.prompt"
    if choice == "tokens":
        ids = draw(st.lists(st.integers(0, 2**31), max_size=5))
        return (
            lambda m: m.prompt.CopyFrom(common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=ids)))
        ), r"\.prompt\.tokens"
    good = [{"role": "user", "content": "hello"}]
    if choice == "no_messages":
        return (lambda m: m.prompt.CopyFrom(common_pb2.Prompt(chat=common_pb2.Conversation()))), (
            r"\.prompt\.chat\.messages"
        )
    if choice == "many":
        messages = good * draw(st.integers(257, 300))
        return (lambda m: m.prompt.CopyFrom(rec.make_prompt(messages))), r"\.prompt\.chat\.messages"
    j = draw(st.integers(0, 3))
    if choice == "role":
        role = draw(st.text(max_size=12).filter(lambda r: r not in ("system", "user", "assistant")))
        broken = {"role": role, "content": "x"}
        field = rf"\.prompt\.chat\.messages\[{j}\]\.role"
    else:
        broken = {"role": "user", "content": draw(bad_text)}
        field = rf"\.prompt\.chat\.messages\[{j}\]\.content"
    messages = good * j + [broken] + good
    return (lambda m: m.prompt.CopyFrom(rec.make_prompt(messages))), field


@st.composite
def common_breakage(draw):
    """Breaks a field every labeled kind has: key, labeler, metadata, prompt id."""
    choice = draw(st.sampled_from(["key", "labeler", "metadata", "prompt_id"]))
    if choice == "key":
        key = draw(st.one_of(st.just(""), st.text(min_size=257, max_size=280), st.just("k\x00")))
        return (lambda m: setattr(m, "idempotency_key", key)), r"\.idempotency_key"
    if choice == "labeler":
        labeler_id = draw(not_a_labeler_id)
        return (lambda m: setattr(m, "labeler_id", labeler_id)), r"\.labeler_id"
    if choice == "prompt_id":
        prompt_id = draw(
            st.text(min_size=65, max_size=80)
        )  # (unknown ids: test_bad_batches_and_key_conflicts)

        def set_prompt_id(m):
            m.prompt_id = prompt_id
            m.ClearField("prompt")

        return set_prompt_id, r"\.prompt_id"
    how = draw(st.sampled_from(["too_many", "empty_key", "long_value", "nul_value"]))
    if how == "too_many":
        metadata = {f"k{i}": "v" for i in range(draw(st.integers(65, 80)))}
    elif how == "empty_key":
        metadata = {"": "v"}
    elif how == "long_value":
        metadata = {"k": "v" * draw(st.integers(4097, 4200))}
    else:
        metadata = {"k": "a\x00b"}
    return (lambda m: m.metadata.update(metadata)), r"\.metadata(\[.*\])?"


@st.composite
def comparison_breakage(draw):
    """(n_responses of the broken record, mutate, field suffix)."""
    choice = draw(
        st.sampled_from(
            [
                "prompt",
                "common",
                "few",
                "many",
                "text",
                "identical",
                "model_version",
                "chosen",
                "no_choice",
                "ranking",
                "ranking_vs_chosen",
                "reason",
            ]
        )
    )
    n = draw(st.integers(2, 5))
    if choice == "prompt":
        return (n, *draw(prompt_breakage()))
    if choice == "common":
        return (n, *draw(common_breakage()))
    if choice == "few":
        keep = draw(st.integers(0, 1))
        return n, (lambda m: [m.responses.pop() for _ in range(len(m.responses) - keep)]), r"\.responses"
    if choice == "many":
        return draw(st.integers(17, 20)), (lambda m: None), r"\.responses"
    j = draw(st.integers(0, n - 1))
    if choice == "text":
        text = draw(bad_text)
        return n, (lambda m: setattr(m.responses[j], "text", text)), rf"\.responses\[{j}\]\.text"
    if choice == "identical":
        j = max(j, 1)
        i = draw(st.integers(0, j - 1))
        return (
            n,
            (lambda m: setattr(m.responses[j], "text", m.responses[i].text)),
            rf"\.responses\[{j}\]\.text",
        )
    if choice == "model_version":
        version = draw(bad_short)
        return (
            n,
            (lambda m: setattr(m.responses[j], "model_version", version)),
            rf"\.responses\[{j}\]\.model_version",
        )
    if choice == "chosen":
        chosen = draw(st.integers(n, 2**32 - 1))
        return n, (lambda m: setattr(m, "chosen_index", chosen)), r"\.chosen_index"
    if choice == "no_choice":
        return n, (lambda m: m.ClearField("chosen_index")), r"\.chosen_index"
    if choice == "ranking":
        ranking = draw(
            st.lists(st.integers(0, 2**32 - 1), max_size=6).filter(
                lambda r: r and sorted(r) != list(range(n))
            )
        )

        def set_ranking(m):
            m.ranking[:] = ranking

        return n, set_ranking, r"\.ranking"
    if choice == "ranking_vs_chosen":
        ranking = draw(st.permutations(list(range(n))))
        chosen = draw(st.integers(0, n - 1).filter(lambda c: c != ranking[0]))

        def set_both(m):
            m.ranking[:] = ranking
            m.chosen_index = chosen

        return n, set_both, r"\.chosen_index"
    reason = draw(st.one_of(st.text(min_size=LIMIT + 1, max_size=LIMIT + 20), st.just("why\x00")))
    return n, (lambda m: setattr(m, "reason", reason)), r"\.reason"


@st.composite
def rating_breakage(draw):
    choice = draw(
        st.sampled_from(["prompt", "common", "score", "nan", "scale", "response", "text", "reason"])
    )
    if choice == "prompt":
        return draw(prompt_breakage())
    if choice == "common":
        return draw(common_breakage())
    if choice == "score":
        low = draw(st.floats(-1e6, 1e6))
        high = low + draw(st.floats(0.001, 1e6))
        score = draw(
            st.one_of(st.floats(max_value=low, exclude_max=True), st.floats(min_value=high, exclude_min=True))
        )
        score = score if math.isfinite(score) else high + 1  # infinities are the "nan" case

        def set_score(m):
            m.scale.CopyFrom(feedback_pb2.RatingScale(min=low, max=high))
            m.score = score

        return set_score, r"\.score"
    if choice == "nan":
        score = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return (lambda m: setattr(m, "score", score)), r"\.score"
    if choice == "scale":
        low = draw(st.floats(allow_nan=True, allow_infinity=True))
        high = draw(st.floats(allow_nan=True, allow_infinity=True))
        if math.isfinite(low) and math.isfinite(high) and low < high:
            low, high = high, low  # min > max
        return (lambda m: m.scale.CopyFrom(feedback_pb2.RatingScale(min=low, max=high))), r"\.scale"
    if choice == "response":
        return (lambda m: m.ClearField("response")), r"\.response"
    if choice == "text":
        text = draw(bad_text)
        return (lambda m: setattr(m.response, "text", text)), r"\.response\.text"
    reason = draw(st.text(min_size=LIMIT + 1, max_size=LIMIT + 10))
    return (lambda m: setattr(m, "reason", reason)), r"\.reason"


@st.composite
def demonstration_breakage(draw):
    choice = draw(st.sampled_from(["prompt", "common", "response", "text", "model_version"]))
    if choice == "prompt":
        return draw(prompt_breakage())
    if choice == "common":
        return draw(common_breakage())
    if choice == "response":
        return (lambda m: m.ClearField("response")), r"\.response"
    if choice == "text":
        text = draw(bad_text)
        return (lambda m: setattr(m.response, "text", text)), r"\.response\.text"
    version = draw(bad_short)
    return (lambda m: setattr(m.response, "model_version", version)), r"\.response\.model_version"


@st.composite
def prompt_record_breakage(draw):
    choice = draw(st.sampled_from(["prompt", "source", "key", "metadata"]))
    if choice == "prompt":
        return draw(prompt_breakage())
    if choice == "source":
        source = draw(bad_short)
        return (lambda m: setattr(m, "source", source)), r"\.source"
    if choice == "key":
        key = draw(st.text(min_size=257, max_size=270))
        return (lambda m: setattr(m, "idempotency_key", key)), r"\.idempotency_key"
    return (lambda m: m.metadata.update({"": "x"})), r"\.metadata(\[.*\])?"


@st.composite
def labeler_breakage(draw):
    choice = draw(st.sampled_from(["id", "kind", "display_name"]))
    if choice == "id":
        labeler_id = draw(st.one_of(st.just(""), not_a_labeler_id))
        return (lambda m: setattr(m, "id", labeler_id)), r"\.id"
    if choice == "kind":
        kind = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in ("human", "simulated")))
        return (lambda m: setattr(m, "kind", kind)), r"\.kind"
    name = draw(bad_short)
    return (lambda m: setattr(m, "display_name", name)), r"\.display_name"


# (field name in the request, request class, method, valid-record factory, breakage strategy)
WRITES = {
    "comparisons": (feedback_pb2.AddComparisonsRequest, "AddComparisons", comparison, comparison_breakage()),
    "ratings": (feedback_pb2.AddRatingsRequest, "AddRatings", rating, rating_breakage()),
    "demonstrations": (
        feedback_pb2.AddDemonstrationsRequest,
        "AddDemonstrations",
        demonstration,
        demonstration_breakage(),
    ),
    "prompts": (feedback_pb2.AddPromptsRequest, "AddPrompts", prompt_record, prompt_record_breakage()),
    "labelers": (feedback_pb2.AddLabelersRequest, "AddLabelers", labeler, labeler_breakage()),
}


# ---- the server under test ------------------------------------------------------------------------------


class Target:
    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(server.target)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.baseline = self.state()
        self.requests = 0

    def state(self):
        stats = self.stub.GetStats(feedback_pb2.GetStatsRequest(), timeout=30)
        return dict(stats.records_by_kind), stats.num_labelers, stats.num_snapshots

    def expect_error(self, method: str, request, codes, field_pattern: str | None = None) -> grpc.RpcError:
        """Send ``request``; it must fail with one of ``codes`` naming the field; nothing may change."""
        self.requests += 1
        call = getattr(self.stub, method)
        with pytest.raises(grpc.RpcError) as info:
            result = call(request, timeout=30)
            if method == "Export":
                list(result)
        err = info.value
        assert err.code() in codes, (err.code(), err.details())
        details = err.details() or ""
        assert CLEAR.match(details), details
        if field_pattern is not None:
            assert re.fullmatch(field_pattern, details.split(": ", 1)[0], flags=re.S), details
        self.assert_serving()
        return err

    def assert_serving(self):
        status = self.health.Check(
            health_pb2.HealthCheckRequest(service="rlhf.v1.FeedbackService"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module", params=BACKENDS)
def target(request, tmp_path_factory):
    url = new_database_url(request, request.param, tmp_path_factory.mktemp("malformed"))
    with running_server(database_url=url, max_text_chars=LIMIT, max_batch_size=MAX_BATCH) as server:
        with server.client() as client:  # what is there before: one comparison, one labeler
            client.add_comparisons(
                [rec.make_comparison("stored", ["a", "b"], idempotency_key=STORED_KEY, chosen_index=0)]
            )
            client.add_labelers([feedback_pb2.Labeler(id="known", kind="human")])
        t = Target(server)
        yield t
        t.channel.close()


# ---- the properties -------------------------------------------------------------------------------------


@settings(max_examples=650, **SETTINGS)
@given(data=st.data())
def test_batch_with_broken_records_names_the_first_one(target, data):
    field = data.draw(st.sampled_from(list(WRITES)), label="kind")
    request_cls, method, make, breakage = WRITES[field]
    size = data.draw(st.integers(1, MAX_BATCH), label="size")
    broken_at = sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=2), label="broken"))
    items, expected = [], None
    for i in range(size):
        if i in broken_at:
            if field == "comparisons":
                n, mutate, suffix = data.draw(breakage)
                item = make(n)
            else:
                mutate, suffix = data.draw(breakage)
                item = make()
            mutate(item)
            expected = expected or rf"{field}\[{i}\]{suffix}"
        else:
            item = make()
        items.append(item)
    request = request_cls(**{field: items})
    target.expect_error(method, request, {grpc.StatusCode.INVALID_ARGUMENT}, expected)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_bad_batches_and_key_conflicts(target, data):
    field = data.draw(st.sampled_from(["comparisons", "ratings", "demonstrations"]), label="kind")
    request_cls, method, make, _ = WRITES[field]
    choice = data.draw(st.sampled_from(["empty", "too_big", "repeated_key", "stored_key", "unknown_prompt"]))
    if choice == "empty":
        target.expect_error(method, request_cls(), {grpc.StatusCode.INVALID_ARGUMENT}, field)
        return
    if choice == "too_big":
        items = [make() for _ in range(data.draw(st.integers(MAX_BATCH + 1, MAX_BATCH + 8)))]
        target.expect_error(method, request_cls(**{field: items}), {grpc.StatusCode.INVALID_ARGUMENT}, field)
        return
    size = data.draw(st.integers(2, MAX_BATCH))
    items = [make() for _ in range(size)]
    j = data.draw(st.integers(1 if choice == "repeated_key" else 0, size - 1))
    if choice == "repeated_key":  # the same key twice in one batch with different content
        i = data.draw(st.integers(0, j - 1))
        items[j].idempotency_key = items[i].idempotency_key
        target.expect_error(
            method,
            request_cls(**{field: items}),
            {grpc.StatusCode.INVALID_ARGUMENT},
            rf"{field}\[{j}\]\.idempotency_key",
        )
    elif choice == "stored_key":  # a stored record's key with other content: found after the other inserts
        if field != "comparisons":  # keys are unique per kind: reuse a comparison key as a comparison
            request_cls, method, make, _ = WRITES["comparisons"]
            items = [comparison() for _ in range(size)]
            field = "comparisons"
        items[j].idempotency_key = STORED_KEY
        target.expect_error(
            method,
            request_cls(**{field: items}),
            {grpc.StatusCode.ALREADY_EXISTS},
            rf"{field}\[{j}\]\.idempotency_key",
        )
    else:  # a prompt id that looks right but is not stored: found in the database, inside the transaction
        items[j].prompt_id = "pr_" + "0" * 24
        target.expect_error(
            method,
            request_cls(**{field: items}),
            {grpc.StatusCode.INVALID_ARGUMENT},
            rf"{field}\[{j}\]\.prompt_id",
        )


@st.composite
def bad_read(draw):
    """(method, request, expected codes, field pattern)."""
    invalid = {grpc.StatusCode.INVALID_ARGUMENT}
    choice = draw(
        st.sampled_from(
            [
                "cursor",
                "kinds",
                "labelers",
                "times",
                "split",
                "snapshot",
                "snap_name",
                "fraction",
                "snap_filter",
                "get",
            ]
        )
    )
    if choice == "cursor":
        cursor = draw(st.text(min_size=1, max_size=80).filter(lambda c: not _is_cursor(c)))
        return "Export", feedback_pb2.ExportRequest(cursor=cursor), invalid, "cursor"
    if choice == "kinds":
        kinds = draw(
            st.lists(st.integers(-(2**31), 2**31 - 1).filter(lambda k: k not in (1, 2, 3, 4)), min_size=1)
        )
        return (
            "Export",
            feedback_pb2.ExportRequest(filter=feedback_pb2.RecordFilter(kinds=kinds)),
            invalid,
            (r"filter\.kinds\[0\]"),
        )
    if choice == "labelers":
        bad = draw(st.one_of(st.just(""), not_a_labeler_id))
        return (
            "Export",
            feedback_pb2.ExportRequest(filter=feedback_pb2.RecordFilter(labeler_ids=["ok", bad])),
            invalid,
            r"filter\.labeler_ids\[1\]",
        )
    if choice == "times":
        before = draw(st.integers(0, 2**40))
        after = before + draw(st.integers(0, 2**20))
        record_filter = rec.make_filter(created_after_us=after, created_before_us=before)
        return "Export", feedback_pb2.ExportRequest(filter=record_filter), invalid, r"filter\.created_before"
    if choice == "split":
        split = draw(st.integers(1, 2**31 - 1))
        return "Export", feedback_pb2.ExportRequest(split=split), invalid, "split"
    if choice == "snapshot":
        name = draw(st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True), st.text(min_size=1)))
        codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        return "Export", feedback_pb2.ExportRequest(snapshot=name), codes, "snapshot"
    if choice == "get":  # a name that cannot exist is INVALID_ARGUMENT, a well-formed unknown one NOT_FOUND
        name = draw(st.text(max_size=40))
        codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        return "GetSnapshot", feedback_pb2.GetSnapshotRequest(name=name), codes, "name"
    snapshot = feedback_pb2.Snapshot(name="fine", eval_fraction=0.1)
    if choice == "snap_name":
        snapshot.name = draw(
            st.text(max_size=140).filter(lambda t: re.fullmatch(r"[A-Za-z0-9._-]{1,128}", t) is None)
        )
        field = r"snapshot\.name"
    elif choice == "fraction":
        snapshot.eval_fraction = draw(
            st.one_of(
                st.floats(max_value=0, exclude_max=True),
                st.floats(min_value=0.9, exclude_min=True),
                st.just(math.nan),
            )
        )
        field = r"snapshot\.eval_fraction"
    else:
        snapshot.filter.kinds.append(draw(st.integers(5, 1000)))
        field = r"snapshot\.filter\.kinds\[0\]"
    return "CreateSnapshot", feedback_pb2.CreateSnapshotRequest(snapshot=snapshot), invalid, field


@settings(max_examples=250, **SETTINGS)
@given(case=bad_read())
def test_malformed_reads(target, case):
    method, request, codes, field = case
    target.expect_error(method, request, codes, field)


@settings(max_examples=150, **SETTINGS)
@given(
    method=st.sampled_from(["AddComparisons", "AddRatings", "AddDemonstrations", "Export", "GetSnapshot"]),
    payload=st.binary(min_size=1, max_size=200),
)
def test_bytes_that_are_not_a_message(target, method, payload):
    """Undecodable bytes are INVALID_ARGUMENT ``request: ...``; bytes that happen to decode are checked as usual."""
    if method == "Export":
        call = target.channel.unary_stream(f"/rlhf.v1.FeedbackService/{method}")
    else:
        call = target.channel.unary_unary(f"/rlhf.v1.FeedbackService/{method}")
    target.requests += 1
    try:
        result = call(payload, timeout=30)
        if method == "Export":
            list(result)
        assert method == "Export", f"{method} accepted {payload!r}"
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            err.code(),
            err.details(),
        )
        assert CLEAR.match(err.details() or ""), err.details()
    target.assert_serving()


def test_the_generated_requests_left_the_store_as_it_was(target):
    """Every rejected batch held valid records with fresh keys and labelers: none of them may be stored."""
    assert target.requests >= 1000
    target.assert_serving()
    assert target.state() == target.baseline, "a rejected request changed the store"
    keys = [rec.exported_record(m).idempotency_key for m in target.stub.Export(feedback_pb2.ExportRequest())]
    assert keys == [STORED_KEY]
