"""Connects the plugin chain to the delivery loop (the scheduler's ``DeliveryChain`` seam).

The scheduler speaks its own :class:`~relay.delivery.scheduler.AttemptContext`; plugins only know the
plugin API's. This adapter translates both ways: before an attempt the plugins get the API context and
whatever they put in ``data`` is what this attempt sends (and nothing else keeps it); a deferral's
``retry_at`` and the recipients taken out of the attempt (``skip``) are handed back. Observers get
:class:`~relay.plugin.DeliveryEvent` values.

Once the attempt is over (:meth:`ChainHook.after_attempt`, called by the scheduler whatever happened)
the plugins' ``after_attempt`` gets the *same* API context their ``before_attempt`` saw — it is kept in
the scheduler context's ``extra`` under :data:`API_CONTEXT` — so what a plugin noted there (leases it
holds) reaches it again.
"""

from __future__ import annotations

from relay.chain import Chain
from relay.delivery.scheduler import AttemptContext as SchedulerAttempt
from relay.plugin import Action, AttemptContext, AttemptFinished, DeliveryEvent, Stage, Verdict
from relay.policies.bounce import Classification, Reply
from relay.store.base import RecipientRow

#: Key of the plugin API's context in the scheduler context's ``extra``.
API_CONTEXT = "plugin_attempt"


class ChainHook:
    """Implements the scheduler's DeliveryChain protocol over a plugin :class:`Chain`."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain

    async def before_attempt(self, ctx: SchedulerAttempt) -> Verdict | None:
        if not self.chain.runs_at(Stage.BEFORE_ATTEMPT):
            return None
        api = _api_context(ctx)
        verdict = await self.chain.before_attempt(api)
        ctx.data = api.data
        ctx.skip.update(api.skip)
        if verdict.action is Action.REJECT_TEMPORARY and verdict.retry_at is not None:
            ctx.retry_at = verdict.retry_at
        return verdict

    async def after_attempt(self, ctx: SchedulerAttempt) -> None:
        if self.chain.runs_at(Stage.AFTER_ATTEMPT):
            await self.chain.after_attempt(AttemptFinished(_api_context(ctx), attempted=ctx.attempted))

    async def delivered(self, ctx: SchedulerAttempt, recipient: RecipientRow, reply: Reply) -> None:
        if self.chain.runs_at(Stage.DELIVERED):
            await self.chain.delivered(DeliveryEvent(ctx.message, recipient, ctx.destination, reply=reply))

    async def deferred(self, ctx: SchedulerAttempt, recipient: RecipientRow, classification: Classification,
                       next_attempt_at: float) -> None:
        if self.chain.runs_at(Stage.DEFERRED):
            await self.chain.deferred(DeliveryEvent(ctx.message, recipient, ctx.destination,
                                                    classification=classification,
                                                    next_attempt_at=next_attempt_at))

    async def bounced(self, ctx: SchedulerAttempt, recipient: RecipientRow,
                      classification: Classification) -> None:
        if self.chain.runs_at(Stage.BOUNCED):
            await self.chain.bounced(DeliveryEvent(ctx.message, recipient, ctx.destination,
                                                   classification=classification))


def _api_context(ctx: SchedulerAttempt) -> AttemptContext:
    """The plugin API's context for this attempt, made once and kept with the scheduler's."""
    api = ctx.extra.get(API_CONTEXT)
    if not isinstance(api, AttemptContext):
        api = AttemptContext(message=ctx.message, recipients=list(ctx.recipients), destination=ctx.destination,
                             route_kind=ctx.route.kind, data=ctx.data)
        ctx.extra[API_CONTEXT] = api
    return api
