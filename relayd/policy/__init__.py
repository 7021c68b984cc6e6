"""The sending policy: pure steps over a message (see ``relayd.policy.pipeline``)."""
