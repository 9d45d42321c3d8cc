"""The per-user ordered event stream: sequencing, history, Pub/Sub fan-out and recovery.

Every event of a user gets the next number of that user's sequence in one Lua script that also
appends it to the user's capped history stream and publishes it, so concurrent publishers can
neither reorder nor skip a seq. Nodes (`Hub`) subscribe per user and deliver into bounded
per-socket queues; a device resumes with one number (`after`) and the history `epoch`.
"""

from fanout.keys import Keys
from fanout.recovery import Gate, Offer, ResumePlan, plan_resume
from fanout.stream import Fenced, PublishResult, UserStream

__all__ = ["Fenced", "Gate", "Keys", "Offer", "PublishResult", "ResumePlan", "UserStream", "plan_resume"]
