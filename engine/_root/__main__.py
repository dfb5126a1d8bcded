from softprompt.engine.cli import main

raise SystemExit(main())
