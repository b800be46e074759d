"""One flow's data path. `consumer` is the loop only (slots, turns, the in-flight bound,
retries); `stages` carries one batch (`batch`, the one object) through admit → decode →
handle → route → prepare → write (`write`) → commit; `fate` is the one place that decides
what becomes of each entry (and holds the one split that finds the entry at fault); `hooks`
is the seam where stats (`stats`) and the tests' fault injection watch the stages.

May import: `flowd.core`, `flowd.source`, `flowd.plugin`, `flowd.clickhouse`,
`flowd.delivery`.
"""
