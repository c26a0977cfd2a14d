from tests.helpers import finish_process_groups_at_exit

finish_process_groups_at_exit()  # in spawned DDP workers only: see its docstring
