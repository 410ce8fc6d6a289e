import sys

if "--kernel-lane" in sys.argv[1:]:
    from bench.lane import main as lane_main

    sys.exit(lane_main([a for a in sys.argv[1:] if a != "--kernel-lane"]))

from bench.run import main

sys.exit(main())
