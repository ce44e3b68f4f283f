from defectlab.cli import main

raise SystemExit(main())
