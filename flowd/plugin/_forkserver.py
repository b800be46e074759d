"""Imported only by the process pool's forkserver, as its preload (flowd.plugin.pool).

The forkserver is the daemon's child; the pool processes are the forkserver's. Each of them
holds the pipe the forkserver waits on to see its clients leave, and each waits for work
from the daemon on a queue it also holds the write end of: after a SIGKILL of the daemon
none of them would ever notice. So the forkserver is killed when the daemon ends, and each
pool process when the forkserver does (flowd.plugin.pool's initializer). A daemon that died before
this line ran is noticed anyway: the forkserver, with no client yet, sees its pipe close.
"""

from flowd.core import lifeline

lifeline.die_with_parent()
