# source bench/gpu/env.sh  -- after bench/gpu/kit_receive.sh printed KIT READY
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
