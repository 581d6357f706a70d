"""moto's server with the Auto Scaling behaviour moto lacks, for Drover's tests.

Run with the venv's python (next to $DROVER_MOTO_SERVER):

    .venv/bin/python tests/moto/server.py [PORT]

It prints `port N` once it listens (PORT 0 or none: a free loopback port) and
exits when its standard input closes, so it never outlives the test that
started it. What it adds to moto (see shared/AWS-EMULATION.md):

- TerminateInstanceInAutoScalingGroup with ShouldDecrementDesiredCapacity=true
  at min size is refused as AWS does: HTTP 400 ValidationError "Currently,
  desiredSize equals minSize (N). ...".
- A group with an autoscaling:EC2_INSTANCE_TERMINATING hook holds an instance
  it terminates in Terminating:Wait until CompleteLifecycleAction, or until the
  hook's heartbeat timeout passes (then the default result applies; for a
  terminating hook both CONTINUE and ABANDON terminate).
- RecordLifecycleActionHeartbeat (restarts the heartbeat timeout) and
  CompleteLifecycleAction.
- DynamoDB requests are served one at a time: moto checks a condition and
  applies the write without a lock, so two concurrent conditional updates
  could both pass (AWS never lets them).
- A DynamoDB Query reads only what it asks for: moto walks (and sorts) every
  item of the table for each Query, which makes a long test quadratic. A
  table Query now reads its partition; an index Query reads the items with
  its hash key value, from buckets kept up to date on every write (see
  IndexBuckets). Answers are the same.
- A DynamoDB transaction keeps for its rollback copies of the items it
  writes, not of the whole table: moto deep-copies every table a
  TransactWriteItems names, once per item, before it writes. Same outcome,
  cancelled or not.
- ECS RunTask can answer with `failures[]` as AWS does when it cannot place
  some of the tasks (see /_drover/run-task-failures below); moto alone
  always starts them all.
- A presigned (query-string SigV4) request past its expiry (X-Amz-Date +
  X-Amz-Expires before now) is refused as S3 does: HTTP 403, S3's XML
  error `AccessDenied` "Request has expired". moto serves it regardless.

Harness endpoints (not AWS; for assertions):

- GET  /_drover/calls          every AWS request received: service, action,
                               params, HTTP status, time (unix ms), and for
                               DynamoDB `table` (the one a batch or a
                               transaction's first item names), `index`
                               (Query, Scan) and `ms` (time serving it,
                               under the lock)
- POST /_drover/faults         {"action", "code", "message", "status", "count",
                               "table", "skip"}: the next `count` requests
                               of `action` (after `skip` more, served as
                               usual) fail with that error, before moto
                               sees them; with "apply": true, after moto
                               applied them (an answer lost on the way
                               back). Query-protocol calls (Auto Scaling,
                               EC2) get Query-protocol XML; JSON-protocol
                               calls (X-Amz-Target) get what AWS answers:
                               DynamoDB `application/x-amz-json-1.0`,
                               {"__type": "com.amazonaws.dynamodb.v20120810#
                               <code>", "message"}, e.g. code
                               ThrottlingException or
                               ProvisionedThroughputExceededException (the
                               SDK retries both); others
                               `application/x-amz-json-1.1` with {"__type":
                               <code>, "message"}. `status` defaults to 400;
                               `message` to AWS's for the two DynamoDB
                               throttling codes. With `table`, only DynamoDB
                               requests naming that table count (tests
                               sharing a server keep their faults apart).
                               Faulted calls are logged like others, with
                               their status.
- GET  /_drover/instance/<id>  {"group", "lifecycle_state", "protected"} of an
                               instance in an Auto Scaling group (404 if none)
- POST /_drover/run-task-failures
                               {"cluster", "reason", "detail", "count"}: the
                               next RunTask calls on that cluster (name or ARN;
                               other clusters are untouched, so concurrent tests
                               do not meet each other's failures) start `count`
                               fewer tasks in all and answer with one
                               `failures` entry {"arn" (the cluster's),
                               "reason", "detail"} per task not started, until
                               `count` is used up; a call asking for k tasks
                               takes at most k of them. `reason` is what AWS
                               says, e.g. "RESOURCE:FARGATE", "RESOURCE:ENI";
                               `detail` is optional. A call that fails
                               (unknown cluster, task definition) uses none.

AWS requests are logged with `action` from the Query protocol's `Action`
parameter or the JSON protocol's X-Amz-Target header; `params` holds the
Query protocol's form parameters ({} for JSON-protocol calls).
"""

import calendar
import copy
import io
import json
import os
import re
import sys
import threading
import time
import uuid
from urllib.parse import parse_qsl

from werkzeug.serving import WSGIRequestHandler, make_server

from moto.autoscaling import models as asg_models
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import ActionResult, EmptyResult
import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.ecs.responses import EC2ContainerServiceResponse
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

LOCK = threading.RLock()
# moto checks a DynamoDB condition and applies the write without a lock, so
# two concurrent conditional updates could both pass (AWS never lets them):
# DynamoDB requests are served one at a time.
DYNAMODB = threading.Lock()
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
MIN_SIZE = (
    "Currently, desiredSize equals minSize ({n}). Terminating instance without "
    "replacement will violate group's min size constraint. Either set "
    "shouldDecrementDesiredCapacity flag to false or lower group's min size."
)


class PendingAction:
    """An instance in Terminating:Wait for one hook."""

    def __init__(self, backend, group, state, hook):
        self.backend = backend
        self.group = group
        self.state = state
        self.hook = hook
        self.token = str(uuid.uuid4())
        self.timer = None
        self.restart_timer()

    def restart_timer(self):
        if self.timer is not None:
            self.timer.cancel()
        self.timer = threading.Timer(
            float(self.hook.heartbeat_timeout), self.timed_out
        )
        self.timer.daemon = True
        self.timer.start()

    def timed_out(self):
        with LOCK:
            if PENDING.get(self.state.instance.id) is self:
                finish(self.state.instance.id, self.hook.default_result)


# instance id -> PendingAction
PENDING = {}


def finish(instance_id, result):
    """Ends a lifecycle wait: the instance leaves the group and terminates."""
    pending = PENDING.pop(instance_id)
    if pending.timer is not None:
        pending.timer.cancel()
    group = pending.group
    group.instance_states = [
        s for s in group.instance_states if s.instance.id != instance_id
    ]
    backend = pending.backend
    backend.ec2_backend.delete_tags(
        [instance_id], {asg_models.ASG_NAME_TAG: group.name}
    )
    backend.ec2_backend.terminate_instances([instance_id])


def terminating_hook(backend, group_name):
    for hook in backend.lifecycle_hooks.values():
        if (
            hook.auto_scaling_group_name == group_name
            and hook.lifecycle_transition == TERMINATING
        ):
            return hook
    return None


def find_state(backend, instance_id):
    for group in backend.autoscaling_groups.values():
        for state in group.instance_states:
            if state.instance.id == instance_id:
                return group, state
    return None, None


original_terminate = asg_models.AutoScalingBackend.terminate_instance


def terminate_instance(self, instance_id, should_decrement):
    with LOCK:
        group, state = find_state(self, instance_id)
        if state is None:
            raise ValidationError(
                f"Instance Id not found - No managed instance found for instance ID: {instance_id}"
            )
        if should_decrement and group.desired_capacity <= group.min_size:
            raise ValidationError(MIN_SIZE.format(n=group.min_size))
        hook = terminating_hook(self, group.name)
        if hook is None:
            return original_terminate(self, instance_id, should_decrement)
        original_size = group.desired_capacity
        if instance_id not in PENDING:
            state.lifecycle_state = "Terminating:Wait"
            if should_decrement:
                group.desired_capacity -= 1
            else:
                # The instance no longer counts as in service: replace it.
                group.set_desired_capacity(group.desired_capacity)
            PENDING[instance_id] = PendingAction(self, group, state, hook)
        return asg_models.TerminateInstanceActivity(state.instance, original_size)


asg_models.AutoScalingBackend.terminate_instance = terminate_instance


def pending_action(response):
    """The PendingAction a heartbeat or completion names, or ValidationError."""
    group_name = response._get_param("AutoScalingGroupName")
    hook_name = response._get_param("LifecycleHookName")
    instance_id = response._get_param("InstanceId")
    token = response._get_param("LifecycleActionToken")
    if instance_id is None and token is not None:
        instance_id = next(
            (i for i, p in PENDING.items() if p.token == token), None
        )
    pending = PENDING.get(instance_id)
    if (
        pending is None
        or pending.group.name != group_name
        or pending.hook.name != hook_name
    ):
        raise ValidationError(
            f"No active Lifecycle Action found with instance ID {instance_id}"
        )
    return instance_id, pending


def record_lifecycle_action_heartbeat(self):
    with LOCK:
        _, pending = pending_action(self)
        pending.restart_timer()
    return EmptyResult()


def complete_lifecycle_action(self):
    result = self._get_param("LifecycleActionResult")
    if result not in ("CONTINUE", "ABANDON"):
        raise ValidationError(
            f"1 validation error detected: Value '{result}' at 'lifecycleActionResult' "
            "failed to satisfy constraint: Member must be CONTINUE or ABANDON"
        )
    with LOCK:
        instance_id, _ = pending_action(self)
        finish(instance_id, result)
    return EmptyResult()


AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat
AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action


# --- ECS RunTask failures --------------------------------------------------

# cluster name -> [{"reason", "detail", "count"}], used in order
RUN_TASK_FAILURES = {}


MOTO_TABLE_QUERY = Table.query


class IndexBuckets:
    """A table's items by the hash key value of each global secondary index.

    Built on a table's first index Query, then kept current by every write:
    Table.put_item, Table.delete_item, DynamoDBBackend.update_item and the
    rollback of transact_write_items below each re-file the item they
    touched (they run under DYNAMODB, one at a time).
    """

    def __init__(self, table):
        self.table = table
        # index name -> hash attribute (indexes with one hash attribute)
        self.attrs = {}
        for index in table.global_indexes or []:
            hashes = [k["AttributeName"] for k in index.schema if k["KeyType"] == "HASH"]
            if len(hashes) == 1:
                self.attrs[index.name] = hashes[0]
        self.buckets = {name: {} for name in self.attrs}  # name -> value -> {key: item}
        self.filed = {}  # key -> {name: value}
        for part in table.items.values():
            for item in part.values() if table.range_key_attr else [part]:
                self.file(item.hash_key, item.range_key, item)

    def file(self, hash_key, range_key, item):
        key = (hash_key, range_key)
        for name, value in self.filed.pop(key, {}).items():
            bucket = self.buckets[name].get(value)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self.buckets[name][value]
        if item is None:
            return
        filed = {}
        for name, attr in self.attrs.items():
            value = item.attrs.get(attr)
            if value is not None:
                self.buckets[name].setdefault(value, {})[key] = item
                filed[name] = value
        if filed:
            self.filed[key] = filed


BUCKETS = {}  # id(table) -> IndexBuckets


def current_item(table, hash_key, range_key):
    part = table.items.get(hash_key)
    if range_key is None or not table.range_key_attr:
        return part
    return part.get(range_key) if part is not None else None


def refile(table, hash_key, range_key):
    buckets = BUCKETS.get(id(table))
    if buckets is not None and buckets.table is table:
        buckets.file(hash_key, range_key, current_item(table, hash_key, range_key))


def table_query(self, hash_key, *args, **kwargs):
    """Table.query over only the items it can return (same answers).

    moto's query calls all_items(), which lists and sorts the whole table.
    DynamoDB requests are served one at a time (DYNAMODB), so shadowing
    all_items on the instance for one call is safe.
    """
    index_name = kwargs.get("index_name", args[6] if len(args) > 6 else None)
    if index_name:
        buckets = BUCKETS.get(id(self))
        if buckets is None or buckets.table is not self:
            buckets = BUCKETS[id(self)] = IndexBuckets(self)
        conditions = kwargs.get("hash_key_conditions") or []
        attr = buckets.attrs.get(index_name)
        if len(conditions) != 1 or attr is None or conditions[0][0] != attr:
            return MOTO_TABLE_QUERY(self, hash_key, *args, **kwargs)
        bucket = buckets.buckets[index_name].get(conditions[0][1], {})

        # The index's own sort orders the results.
        def items():
            return list(bucket.values())

    elif self.range_key_attr:

        def items():
            part = self.items.get(hash_key, {})
            return sorted(part.values(), key=lambda item: item.range_key)

    else:
        return MOTO_TABLE_QUERY(self, hash_key, *args, **kwargs)
    self.all_items = items
    try:
        return MOTO_TABLE_QUERY(self, hash_key, *args, **kwargs)
    finally:
        del self.all_items


MOTO_TABLE_PUT_ITEM = Table.put_item
MOTO_TABLE_DELETE_ITEM = Table.delete_item


def table_put_item(self, *args, **kwargs):
    item = MOTO_TABLE_PUT_ITEM(self, *args, **kwargs)
    refile(self, item.hash_key, item.range_key)
    return item


def table_delete_item(self, hash_key, range_key):
    try:
        return MOTO_TABLE_DELETE_ITEM(self, hash_key, range_key)
    finally:
        refile(self, hash_key, range_key)


Table.put_item = table_put_item
Table.delete_item = table_delete_item


Table.query = table_query


class TablesByReference:
    """`copy` for moto's DynamoDB backend: a Table "copy" is the table itself.

    transact_write_items deep-copies whole tables to roll back; with this its
    rollback is a no-op and transact_write_items below restores the items
    the transaction touched instead.
    """

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        if isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)


dynamodb_models.copy = TablesByReference()
MOTO_TRANSACT_WRITE_ITEMS = dynamodb_models.DynamoDBBackend.transact_write_items


def transact_write_items(self, transact_items):
    """TransactWriteItems with a rollback of only the items it names."""
    saved = []
    for entry in transact_items:
        for op in entry.values():
            if not isinstance(op, dict):
                continue
            table = self.tables.get(op.get("TableName"))
            key = op.get("Key") or op.get("Item")
            if table is None or not isinstance(key, dict):
                continue
            try:
                hash_key = DynamoType(key[table.hash_key_attr])
                range_key = (
                    DynamoType(key[table.range_key_attr])
                    if table.range_key_attr
                    else None
                )
            except KeyError:
                continue  # moto rejects it before writing anything
            part = table.items.get(hash_key)
            if range_key is None:
                current = part
            else:
                current = part.get(range_key) if part is not None else None
            saved.append((table, hash_key, range_key, copy.deepcopy(current)))
    try:
        return MOTO_TRANSACT_WRITE_ITEMS(self, transact_items)
    except Exception:
        for table, hash_key, range_key, item in reversed(saved):
            if range_key is None:
                if item is None:
                    table.items.pop(hash_key, None)
                else:
                    table.items[hash_key] = item
            elif item is not None:
                table.items[hash_key][range_key] = item
            else:
                part = table.items.get(hash_key)
                if part is not None:
                    part.pop(range_key, None)
                    if not part:
                        del table.items[hash_key]
            refile(table, hash_key, range_key)
        raise


dynamodb_models.DynamoDBBackend.transact_write_items = transact_write_items
MOTO_UPDATE_ITEM = dynamodb_models.DynamoDBBackend.update_item


def update_item(self, table_name, key, *args, **kwargs):
    """UpdateItem changes its item in place: re-file it (IndexBuckets)."""
    try:
        return MOTO_UPDATE_ITEM(self, table_name, key, *args, **kwargs)
    finally:
        table = self.tables.get(table_name)
        if table is not None and table.hash_key_attr in key:
            range_key = (
                DynamoType(key[table.range_key_attr])
                if table.range_key_attr and table.range_key_attr in key
                else None
            )
            refile(table, DynamoType(key[table.hash_key_attr]), range_key)


dynamodb_models.DynamoDBBackend.update_item = update_item


def cluster_name(cluster):
    """A cluster's name from its name or ARN (arn:aws:ecs:…:cluster/NAME)."""
    return str(cluster or "default").split("/")[-1]


def take_run_task_failures(cluster, wanted):
    """Up to `wanted` injected failures for `cluster`, removed from its list."""
    taken = []
    with LOCK:
        queue = RUN_TASK_FAILURES.get(cluster, [])
        while queue and len(taken) < wanted:
            planned = queue[0]
            n = min(planned["count"], wanted - len(taken))
            taken.extend([(planned["reason"], planned.get("detail"))] * n)
            planned["count"] -= n
            if planned["count"] <= 0:
                queue.pop(0)
    return taken


def give_back_run_task_failures(cluster, taken):
    with LOCK:
        queue = RUN_TASK_FAILURES.setdefault(cluster, [])
        for reason, detail in reversed(taken):
            queue.insert(0, {"reason": reason, "detail": detail, "count": 1})


def ecs_run_task(self):
    """moto's RunTask (moto 5.2.5's parameters) with injected failures."""
    cluster = self._get_param("cluster", "default")
    count = self._get_int_param("count", 1)
    failing = take_run_task_failures(cluster_name(cluster), count)
    try:
        tasks = self.ecs_backend.run_task(
            cluster,
            self._get_param("taskDefinition"),
            count - len(failing),
            self._get_param("overrides"),
            self._get_param("startedBy"),
            self._get_param("tags"),
            self._get_param("launchType"),
            self._get_param("networkConfiguration"),
            self._get_param("group"),
            self._get_param("platformVersion"),
            self._get_param("capacityProviderStrategy"),
        )
    except BaseException:
        give_back_run_task_failures(cluster_name(cluster), failing)
        raise
    arn = self.ecs_backend._get_cluster(cluster).arn
    failures = []
    for reason, detail in failing:
        failure = {"arn": arn, "reason": reason}
        if detail:
            failure["detail"] = detail
        failures.append(failure)
    return ActionResult({"tasks": tasks, "failures": failures})


EC2ContainerServiceResponse.run_task = ecs_run_task


# --- harness endpoints and call log ----------------------------------------

CALLS = []
FAULTS = []  # dicts: action, code, message, status, count[, table, skip, apply]
SCOPE = re.compile(r"Credential=[^/]+/[^/]+/([^/]+)/([^/]+)/")
DYNAMODB_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
# What DynamoDB says with its throttling errors.
DEFAULT_MESSAGES = {
    "ThrottlingException": "Rate of requests exceeds the allowed throughput.",
    "ProvisionedThroughputExceededException": (
        "The level of configured provisioned throughput for the table was "
        "exceeded. Consider increasing your provisioning level with the "
        "UpdateTable API."
    ),
}


def error_xml(code, message):
    return (
        '<ErrorResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()


def request_table(request):
    """The table a DynamoDB request names: TableName, the one table of a
    BatchGetItem/BatchWriteItem, or the first item's of a transaction."""
    if request.get("TableName"):
        return request["TableName"]
    items = request.get("RequestItems")
    if isinstance(items, dict) and len(items) == 1:
        return next(iter(items))
    for entry in request.get("TransactItems") or []:
        for op in entry.values():
            if isinstance(op, dict) and op.get("TableName"):
                return op["TableName"]
    return None


def fault_answer(fault, service, json_protocol):
    """(body, content type) of an injected error, in the call's protocol."""
    code = fault["code"]
    message = fault.get("message") or DEFAULT_MESSAGES.get(code, code)
    if not json_protocol:
        return error_xml(code, message), "text/xml"
    if service == "dynamodb":
        body = {"__type": DYNAMODB_ERROR_PREFIX + code, "message": message}
        return json.dumps(body).encode(), "application/x-amz-json-1.0"
    return json.dumps({"__type": code, "message": message}).encode(), "application/x-amz-json-1.1"


def presigned_expiry(query):
    """(X-Amz-Expires, expiry as unix seconds) of a presigned SigV4 request."""
    params = dict(parse_qsl(query))
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return None
    try:
        signed = time.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        expires = int(params["X-Amz-Expires"])
    except (KeyError, ValueError):
        return None  # moto answers a malformed request as it would
    return expires, calendar.timegm(signed) + expires


def iso_time(unix_s):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def expired_xml(expires, expired_at, now):
    """S3's answer to a presigned request past its expiry."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Error><Code>AccessDenied</Code><Message>Request has expired</Message>"
        f"<X-Amz-Expires>{expires}</X-Amz-Expires><Expires>{iso_time(expired_at)}</Expires>"
        f"<ServerTime>{iso_time(now)}</ServerTime><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
        f"<HostId>{uuid.uuid4()}</HostId></Error>"
    ).encode()


def instance_info(instance_id):
    for backend in all_autoscaling_backends():
        with LOCK:
            group, state = find_state(backend, instance_id)
            if state is not None:
                return {
                    "group": group.name,
                    "lifecycle_state": state.lifecycle_state,
                    "protected": bool(state.protected_from_scale_in),
                }
    return None


def all_autoscaling_backends():
    for account in asg_models.autoscaling_backends.values():
        for backend in account.values():
            yield backend


def respond(start_response, status, body, content_type="application/json"):
    start_response(
        status, [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    )
    return [body]


def harness(app):
    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if path == "/_drover/calls":
            with LOCK:
                data = json.dumps(CALLS).encode()
            return respond(start_response, "200 OK", data)
        if path == "/_drover/faults" and method == "POST":
            fault = json.loads(body)
            with LOCK:
                FAULTS.append(fault)
            return respond(start_response, "200 OK", b"{}")
        if path == "/_drover/run-task-failures" and method == "POST":
            planned = json.loads(body)
            count = int(planned.get("count", 0))
            if not planned.get("cluster") or not planned.get("reason") or count < 1:
                return respond(
                    start_response,
                    "400 Bad Request",
                    b'{"error": "cluster, reason and count >= 1 are required"}',
                )
            with LOCK:
                RUN_TASK_FAILURES.setdefault(cluster_name(planned["cluster"]), []).append(
                    {
                        "reason": planned["reason"],
                        "detail": planned.get("detail"),
                        "count": count,
                    }
                )
            return respond(start_response, "200 OK", b"{}")
        if path.startswith("/_drover/instance/"):
            info = instance_info(path.rsplit("/", 1)[1])
            if info is None:
                return respond(start_response, "404 Not Found", b"{}")
            return respond(start_response, "200 OK", json.dumps(info).encode())

        query = environ.get("QUERY_STRING", "")
        scope = SCOPE.search(environ.get("HTTP_AUTHORIZATION", "")) or SCOPE.search(
            "Credential=" + dict(parse_qsl(query)).get("X-Amz-Credential", "")
        )
        service = scope.group(2) if scope else ""
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        extra = {}
        if target:
            # JSON protocol (DynamoDB, ECS): the operation is in a header.
            params = {}
            action = target.rsplit(".", 1)[-1]
            if service == "dynamodb":
                request = json.loads(body or b"{}")
                extra = {
                    "table": request_table(request),
                    "index": request.get("IndexName"),
                }
        else:
            params = dict(parse_qsl(body.decode("utf-8", "replace")))
            action = params.pop("Action", "")
        record = {
            "service": service,
            "action": action,
            "params": params,
            "time_ms": int(time.time() * 1000),
            "status": 0,
            **extra,
        }
        with LOCK:
            CALLS.append(record)
            fault = next(
                (
                    f
                    for f in FAULTS
                    if f["action"] == action
                    and f["count"] > 0
                    and f.get("table") in (None, extra.get("table"))
                ),
                None,
            )
            if fault is not None and fault.get("skip", 0) > 0:
                fault["skip"] -= 1
                fault = None
            elif fault is not None:
                fault["count"] -= 1

        def fail():
            record["status"] = int(fault.get("status", 400))
            reason = "Bad Request" if record["status"] < 500 else "Service Unavailable"
            body, content_type = fault_answer(fault, service, bool(target))
            return respond(
                start_response, f"{record['status']} {reason}", body, content_type
            )

        if fault is not None and not fault.get("apply"):
            return fail()
        expiry = presigned_expiry(query)
        now = time.time()
        if expiry is not None and now > expiry[1]:
            record["status"] = 403
            return respond(
                start_response,
                "403 Forbidden",
                expired_xml(expiry[0], expiry[1], now),
                "application/xml",
            )

        def capture(status, headers, exc_info=None):
            record["status"] = int(status.split()[0])
            if fault is not None:
                return lambda data: None  # applied; the fault is the answer
            return start_response(status, headers, exc_info)

        if service == "dynamodb":
            with DYNAMODB:
                # The whole answer is produced under the lock.
                began = time.perf_counter()
                answer = list(app(environ, capture))
                record["ms"] = round((time.perf_counter() - began) * 1000, 3)
        elif fault is not None:
            answer = list(app(environ, capture))
        else:
            return app(environ, capture)
        return fail() if fault is not None else answer

    return wrapped


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app = harness(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", port, app, threaded=True, request_handler=QuietHandler
    )

    def exit_when_stdin_closes():
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    print(f"port {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
