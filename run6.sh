mkdir -p /tmp/shim && ln -sfn $PWD/patterns /tmp/shim/truthfuse_patterns
export PYTHONPATH=/tmp/shim:$PWD TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
(cd bench && mkdir -p $OUT/mc && OUT=$OUT/mc timeout 330 python model_checks_gpu.py > $OUT/mc.log 2>&1; echo mc rc=$? >> $OUT/mc.log) &
sleep 1
OUT=$OUT timeout 200 python bench/autocast_gpu.py --skip-speed > $OUT/autocast.log 2>&1; echo rc=$?
grep "== " $OUT/autocast.log | cut -c1-250
wait
grep "== check" $OUT/mc.log | grep -E "FAIL" | cut -c1-250; grep -A3 FAIL $OUT/mc.log | head -20; tail -2 $OUT/mc.log; date -u
